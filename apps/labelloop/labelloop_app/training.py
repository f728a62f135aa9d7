"""Pieces every LabelLoop trainer shares: per-epoch history in the train stats, atomic publishing, time budget."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from ignite.handlers import TimeLimit
from monai.data import CacheDataset, SmartCacheDataset
from monai.engines.workflow import Engine, Events
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.tasks.train.handler import PublishStatsAndModel, prepare_stats

from labelloop_app.transforms import plain_tensor

logger = logging.getLogger(__name__)


def atomic_copy(src: str, dst: str) -> None:
    """Copy so that a reader (the infer task reloading the model) never sees a partial file."""
    tmp = f"{dst}.tmp-{os.getpid()}"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _scalar(v: Any) -> Any:
    if torch.is_tensor(v):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


class EpochLoss:
    """Mean training loss of each epoch (SupervisedTrainer outputs one loss per iteration)."""

    def __init__(self):
        self.total = 0.0
        self.count = 0
        self.last_epoch_mean: Optional[float] = None

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.EPOCH_STARTED, self._reset)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._add)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._close)

    def _reset(self, engine: Engine) -> None:
        self.total, self.count = 0.0, 0

    def _add(self, engine: Engine) -> None:
        out = engine.state.output
        items = out if isinstance(out, list) else [out]
        for item in items:
            if isinstance(item, dict) and "loss" in item:
                self.total += float(_scalar(item["loss"]))
                self.count += 1
                break  # one loss per iteration, repeated in every decollated item

    def _close(self, engine: Engine) -> None:
        self.last_epoch_mean = self.mean()

    def mean(self) -> Optional[float]:
        """Mean loss of the epoch so far (the whole epoch once its iterations are done)."""
        return self.total / self.count if self.count else None


def attach_time_budget(trainer: Engine, minutes: float, evaluator: Optional[Engine] = None) -> None:
    """Stop training gracefully after ``minutes`` (ignite's ``TimeLimit``; the best model so far stays published).

    The budget ends mid-epoch, where no validation follows: with ``evaluator``, the weights reached are validated
    then (and published if they are the best), so the training since the last validation is not lost. With long
    epochs that was up to a third of a classification benchmark's budget.
    """
    trainer.add_event_handler(Events.ITERATION_COMPLETED, TimeLimit(max(1, int(round(minutes * 60)))))
    if evaluator is not None:
        trainer.add_event_handler(Events.TERMINATE, lambda engine: evaluator.run(engine.state.epoch))


class PolyLR:
    """Polynomial learning-rate decay (nnU-Net's ``(1 - progress) ** 0.9``) over the run.

    ``progress`` is the larger of the share of iterations done (``max_epochs``) and the share of the time budget
    spent (``max_minutes``), so a run limited by either one anneals to a low rate by its end: a short CPU run
    gains more from this than from any fixed rate. (PyTorch's ``PolynomialLR`` counts steps only.)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, minutes: float = 0.0, power: float = 0.9, floor: float = 0.02):
        self.optimizer = optimizer
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.seconds = minutes * 60.0
        self.power = power
        self.floor = floor
        self.start = time.time()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_STARTED, self._step)

    def progress(self, engine: Engine) -> float:
        total = (engine.state.max_epochs or 1) * (engine.state.epoch_length or 1)
        done = engine.state.iteration / max(total, 1)
        if self.seconds > 0:
            done = max(done, (time.time() - self.start) / self.seconds)
        return done  # set_progress clamps it to [0, 1]

    def _step(self, engine: Engine) -> None:
        self.set_progress(self.progress(engine))

    def set_progress(self, progress: float) -> None:
        """Set the rate for ``progress`` (0 at the start, 1 at the end); also for loops without an ignite engine."""
        factor = max((1.0 - min(max(progress, 0.0), 1.0)) ** self.power, self.floor)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * factor


class PublishWithHistory(PublishStatsAndModel):
    """MONAI Label's publisher plus an epoch-by-epoch history, written and published atomically.

    ``record`` maps the engines' state to the entry appended for each epoch; the stats file is what ``/info/``
    shows as ``train_stats``, so clients can draw learning curves while training runs.
    """

    def __init__(self, *args, record: Callable[[], Dict[str, Any]], extra: Dict[str, Any], **kwargs):
        super().__init__(*args, **kwargs)
        self.record = record
        self.extra = extra
        self.history: List[Dict[str, Any]] = []
        self.last = time.time()

    def iteration_completed(self):
        now = time.time()
        entry = {"epoch": self.trainer.state.epoch, "seconds": round(now - self.last, 2)}
        entry.update(self.record())
        self.last = now
        self.history.append(entry)
        return self.write(now, entry)

    def attach(self, trainer: Engine, evaluator: Optional[Engine] = None) -> None:
        """Publish after each validation, or after each epoch without one. A time budget ends the run mid-epoch,
        where no epoch completes: with an evaluator the final validation publishes; without one, the end of the run
        is published, not left at the epoch before."""
        (evaluator or trainer).add_event_handler(Events.EPOCH_COMPLETED, self)
        if evaluator is None:
            trainer.add_event_handler(Events.TERMINATE, self.run_ended)

    def run_ended(self, engine: Optional[Engine] = None):
        """Stats where the run ended without completing an epoch (a time budget stops mid-epoch): the elapsed time
        and iteration move on to the end, the history keeps the finished epochs only."""
        return self.write(time.time(), self.history[-1] if self.history else {})

    def write(self, now: float, entry: Dict[str, Any]):
        """Write and publish the stats as of ``now`` (the latest history ``entry`` repeated at the top level), and
        publish the best model if it changed."""
        stats = prepare_stats(self.start_ts, self.trainer, self.evaluator)
        stats.update(self.extra)
        stats["total_epochs"] = self.trainer.state.max_epochs
        stats["run_id"] = self.run_id
        stats["elapsed_seconds"] = round(now - self.start_ts, 1)
        stats["history"] = self.history
        stats.update({k: v for k, v in entry.items() if k not in ("epoch", "seconds")})

        atomic_write_json(os.path.join(self.output_dir, f"stats_{self.run_id}.json"), stats)
        if self._stats_path:
            atomic_write_json(self._stats_path, stats)

        final_model = os.path.join(self.output_dir, self._key_metric_filename)
        if self._publish_path and os.path.exists(final_model):
            changed = not os.path.exists(self._publish_path) or os.path.getmtime(final_model) > os.path.getmtime(
                self._publish_path
            )
            if changed:
                atomic_copy(final_model, self._publish_path)
                logger.info("New model published: %s => %s", final_model, self._publish_path)
        return stats


class PreprocessedImages:
    """Training images by id as the training dataset's deterministic transforms leave them, for work done during
    training on whole images (mapping hard negatives).

    A :class:`~monai.data.CacheDataset` already holds them: its cached item is returned as it is, neither computed
    again nor copied. Otherwise (another dataset type, an item not cached) ``preprocess`` runs once per image and
    the result is kept.
    """

    def __init__(self, dataset: Any, datalist: Sequence[Dict[str, Any]], preprocess: Callable[[Dict], Dict]):
        self.dataset, self.preprocess = dataset, preprocess
        self.items = {str(d["image_id"]): (i, d) for i, d in enumerate(datalist)}
        self.computed: Dict[str, torch.Tensor] = {}

    def cached(self, index: int) -> Optional[torch.Tensor]:
        ds = self.dataset
        if not isinstance(ds, CacheDataset) or isinstance(ds, SmartCacheDataset) or ds.hash_as_key:
            return None  # a smart cache rotates its items; a hashed cache does not keep the datalist's order
        cache = getattr(ds, "_cache", None)
        item = cache[index] if cache is not None and 0 <= index < min(ds.cache_num, len(cache)) else None
        image = item.get("image") if isinstance(item, dict) else None
        return None if image is None else plain_tensor(image)

    def __getitem__(self, image_id: str) -> torch.Tensor:
        index, item = self.items[image_id]
        image = self.cached(index)
        if image is not None:
            return image
        if image_id not in self.computed:
            logger.info("Preprocessing %s again: the training dataset does not cache it", image_id)
            self.computed[image_id] = plain_tensor(self.preprocess({"image": item["image"]})["image"])
        return self.computed[image_id]


def metrics_of(engine: Optional[Engine], prefix: str) -> Dict[str, float]:
    """The engine's current metrics (floats), keys without ``prefix``."""
    if engine is None:
        return {}
    return {k[len(prefix) :] if k.startswith(prefix) else k: float(_scalar(v)) for k, v in engine.state.metrics.items()}


EPOCHS_UNDER_A_BUDGET = 10000
"""``max_epochs`` of a request that gives ``max_minutes`` alone: the time budget ends the run."""


class LabelLoopTrainTask(BasicTrainTask):
    """What every LabelLoop trainer shares on top of MONAI Label's ``BasicTrainTask``.

    Fine-tuning from the model being served, AdamW with a polynomially decaying rate, an optional time budget
    (request ``max_minutes``), and a publisher that keeps a per-epoch history in the train stats and publishes the
    best model atomically. Subclasses give ``record`` (the history entry of an epoch) and ``stats_extra``.
    Request parameters beyond MONAI Label's: ``learning_rate``, ``max_minutes`` (with no ``max_epochs`` in the
    request, the budget alone ends the run, and the stats say so with ``until_budget``).
    """

    default_lr = 2e-3
    weight_decay = 1e-5

    def __init__(self, network: torch.nn.Module, publish_path: str, config: Dict[str, Any], **kwargs):
        self._network = network
        base = {
            "val_split": 0.2,
            "val_batch_size": 1,
            "learning_rate": self.default_lr,
            "max_minutes": 0,
            "dataset": "CacheDataset",
            "dataloader": "ThreadDataLoader",
            "tracking": "None",
        }
        super().__init__(
            amp=torch.cuda.is_available(),
            load_path=publish_path,
            publish_path=publish_path,
            load_strict=False,
            config={**base, **config},
            **kwargs,
        )

    def __call__(self, request, datastore):
        if float(request.get("max_minutes") or 0) > 0 and "max_epochs" not in request:
            request = {**request, "max_epochs": EPOCHS_UNDER_A_BUDGET, "until_budget": True}
        return super().__call__(request, datastore)

    def load_path(self, output_dir, pretrained=True):
        """Fine-tune from the model being served, when there is one."""
        return self._load_path if pretrained else None

    def network(self, context: Context):
        return self._network

    def optimizer(self, context: Context):
        lr = float(context.request.get("learning_rate", self.default_lr))
        return torch.optim.AdamW(context.network.parameters(), lr=lr, weight_decay=self.weight_decay)

    def lr_scheduler_handler(self, context: Context):
        """None: :class:`PolyLR`, attached in :meth:`finalize`, sets the rate at every iteration."""
        return None

    def record(self, context: Context, loss: EpochLoss) -> Dict[str, Any]:
        """The history entry of the epoch just completed."""
        return {"loss": loss.mean()}

    def stats_extra(self, context: Context) -> Dict[str, Any]:
        """Fields added to the train stats besides the history."""
        return {
            "train_images": len(context.train_datalist),
            "val_images": len(context.val_datalist),
            "max_minutes": float(context.request.get("max_minutes") or 0),
            "until_budget": bool(context.request.get("until_budget")),
        }

    def finalize(self, context: Context):
        """Attach the publisher with per-epoch history (replacing MONAI Label's), the rate decay and the budget."""
        minutes = float(context.request.get("max_minutes", 0) or 0)
        if context.local_rank == 0:
            loss = EpochLoss()
            loss.attach(context.trainer)
            publisher = PublishWithHistory(
                self._stats_path,
                self._publish_path,
                self._key_metric_filename,
                context.start_ts,
                context.run_id,
                context.output_dir,
                context.trainer,
                context.evaluator,
                record=lambda: self.record(context, loss),
                extra=self.stats_extra(context),
            )
            publisher.attach(context.trainer, context.evaluator)

        PolyLR(context.optimizer, minutes).attach(context.trainer)
        if minutes > 0:
            attach_time_budget(context.trainer, minutes, context.evaluator)
