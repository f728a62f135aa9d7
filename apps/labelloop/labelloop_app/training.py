"""Pieces every LabelLoop trainer shares: per-epoch history in the train stats, atomic publishing, time budget."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from monai.engines.workflow import Engine, Events
from monailabel.tasks.train.handler import PublishStatsAndModel, prepare_stats

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


class TimeBudget:
    """Stop training gracefully after ``minutes`` (the best model so far stays published)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.start = time.time()

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._check)

    def _check(self, engine: Engine) -> None:
        if time.time() - self.start > self.seconds:
            logger.info("Time budget of %.1f min reached; stopping after this iteration", self.seconds / 60)
            engine.terminate()


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


def metrics_of(engine: Optional[Engine], prefix: str) -> Dict[str, float]:
    """The engine's current metrics (floats), keys without ``prefix``."""
    if engine is None:
        return {}
    return {k[len(prefix) :] if k.startswith(prefix) else k: float(_scalar(v)) for k, v in engine.state.metrics.items()}
