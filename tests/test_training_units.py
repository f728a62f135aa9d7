"""Units of the shared trainer pieces: the learning-rate decay and the time budget."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events

from labelloop_app.training import PolyLR, PreprocessedImages, attach_time_budget


def run_engine(handler_factory, epochs: int = 3, length: int = 4, sleep: float = 0.0):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    seen = []

    def step(engine, batch):
        seen.append(opt.param_groups[0]["lr"])
        if sleep:
            time.sleep(sleep)

    engine = Engine(step)
    handler_factory(opt).attach(engine)
    engine.run(range(length), max_epochs=epochs)
    return seen, engine


def test_poly_decay_over_iterations_starts_at_the_base_rate_and_anneals():
    lrs, _ = run_engine(lambda opt: PolyLR(opt))
    assert len(lrs) == 12
    assert lrs[0] == pytest.approx(0.1 * (1 - 1 / 12) ** 0.9)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 * 0.02)  # the floor, not zero


def test_poly_decay_follows_the_time_budget_when_it_ends_first():
    # 12 iterations of 50 ms against a 0.3 s budget: the rate reaches its floor by time, long before the last epoch
    lrs, _ = run_engine(lambda opt: PolyLR(opt, minutes=0.3 / 60), sleep=0.05)
    assert lrs[-1] == pytest.approx(0.1 * 0.02)
    iteration_only = [0.1 * max((1 - (i + 1) / 12) ** 0.9, 0.02) for i in range(12)]
    assert lrs[6] < iteration_only[6]


def test_time_budget_stops_the_run_early():
    budget = SimpleNamespace(attach=lambda engine: attach_time_budget(engine, 1 / 60))
    lrs, engine = run_engine(lambda opt: budget, epochs=100, sleep=0.1)
    # one second of 100 ms iterations: about ten iterations, not the 400 the epochs ask for
    assert engine.state.epoch < 100
    assert 5 <= len(lrs) < 40


def test_poly_decay_set_by_progress_in_a_plain_loop():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    schedule = PolyLR(optimizer)
    rates = []
    for progress in (-1.0, 0.0, 0.5, 0.99, 1.0, 2.0):
        schedule.set_progress(progress)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == rates[1] == 0.5  # before the start: the base rate
    assert rates[2] == pytest.approx(0.5 * 0.5**0.9)
    assert rates[3] == pytest.approx(0.5 * 0.02)  # (0.01 ** 0.9 = 0.016) is below the floor
    assert rates[4] == rates[5] == pytest.approx(0.5 * 0.02)


def test_time_budget_validates_the_weights_reached_when_it_ends_mid_epoch():
    """Epochs of 2 s against a 1 s budget: no epoch completes, so without the final validation the run would
    publish nothing it learned."""
    validated, completed = [], []
    engine = Engine(lambda engine, batch: time.sleep(0.1))
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: completed.append(e.state.epoch))
    attach_time_budget(engine, 1 / 60, SimpleNamespace(run=validated.append))
    engine.run(range(20), max_epochs=5)
    assert completed == [] and validated == [1]


def test_preprocessed_images_come_from_the_cache_dataset_and_the_rest_is_computed_once():
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose, Lambdad, RandShiftIntensityd

    calls = []

    def double(x):
        calls.append(1)
        return torch.as_tensor(x) * 2

    datalist = [{"image_id": f"i{k}", "image": torch.full((1, 2, 2, 2), float(k))} for k in range(3)]
    deterministic = [Lambdad(keys="image", func=double)]
    training = Compose([*deterministic, RandShiftIntensityd(keys="image", offsets=1.0, prob=1.0)])

    cached = CacheDataset(datalist, training, cache_rate=1.0, num_workers=0, progress=False)
    assert len(calls) == 3
    images = PreprocessedImages(cached, datalist, Compose(deterministic))
    for k in range(3):
        assert torch.equal(images[f"i{k}"], torch.full((1, 2, 2, 2), 2.0 * k))
        assert images[f"i{k}"].data_ptr() == cached._cache[k]["image"].data_ptr()  # the cached tensor, no copy
    assert len(calls) == 3  # nothing preprocessed again

    partly = CacheDataset(datalist, training, cache_num=1, num_workers=0, progress=False)
    plain = Dataset(datalist, training)
    for dataset, cached_ids in ((partly, ["i0"]), (plain, []), (None, [])):
        calls.clear()
        images = PreprocessedImages(dataset, datalist, Compose(deterministic))
        for _ in range(2):
            assert [float(images[f"i{k}"].max()) for k in range(3)] == [0.0, 2.0, 4.0]
        assert len(calls) == 3 - len(cached_ids)  # each image not cached: once, then kept


@pytest.mark.parametrize("with_evaluator", [False, True])
def test_stats_are_published_where_a_time_budget_ends_the_run_mid_epoch(tmp_path, with_evaluator):
    """Epochs of 2 s against a 1 s budget: no epoch completes, yet the stats show the run's end (elapsed time at
    least the budget, the iterations done) with an empty history; with an evaluator the final validation publishes."""
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    from labelloop_app.training import PublishWithHistory

    net = torch.nn.Linear(2, 1)
    items = [{"image": torch.zeros(2), "label": torch.zeros(1)} for _ in range(20)]
    batches = torch.utils.data.DataLoader(items, batch_size=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=3,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
        loss_function=torch.nn.MSELoss(),
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: time.sleep(0.1))
    evaluator = (
        SupervisedEvaluator(torch.device("cpu"), torch.utils.data.DataLoader(items[:2]), net)
        if with_evaluator
        else None
    )
    start = time.time()
    publisher = PublishWithHistory(
        str(tmp_path / "stats.json"), None, "model.pt", start, "run", str(tmp_path), trainer, evaluator,
        record=lambda: {"loss": 0.5}, extra={"max_minutes": 1 / 60},
    )  # fmt: skip
    publisher.attach(trainer, evaluator)
    attach_time_budget(trainer, 1 / 60, evaluator)
    trainer.run()

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["epoch"] == 1 and 5 <= stats["current_iteration"] < 20
    assert stats["elapsed_seconds"] >= 1.0 and stats["max_minutes"] == 1 / 60
    assert stats["history"] == (
        [{"epoch": 1, "seconds": stats["history"][0]["seconds"], "loss": 0.5}] if with_evaluator else []
    )
