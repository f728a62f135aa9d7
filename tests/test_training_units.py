"""Units of the shared trainer pieces: the learning-rate decay and the time budget."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from ignite.engine import Engine, Events

from labelloop_app.training import PolyLR, attach_time_budget


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
