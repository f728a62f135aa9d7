"""The annotation workflow of LabelLoop, without Slicer: connect, fetch a sample, pre-segment, submit, train.

Why a Slicer-free layer: everything here can be tested against a real server with plain Python, and the Slicer
module keeps only what needs Slicer (nodes, widgets). The module runs these calls off the main thread through
:class:`JobRunner` and applies their results on the main thread from a ``QTimer`` that calls
:meth:`JobRunner.poll` - Qt widgets and MRML nodes must only be touched from the main thread.

Submitting converts the annotator's segmentation to the server's label values *by segment name*: a segment
called ``liver`` is written with the server's value for ``liver`` whatever its position or Slicer label value.
Segments whose name the server does not know are refused (listed in the error) unless explicitly dropped.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from LabelLoopLib import colors as colormod
from LabelLoopLib import segio
from LabelLoopLib.client import (
    EXPLAIN_METHODS,
    LabelLoopClient,
    LabelLoopError,
    OperationCancelled,
    ServerError,
    ServerUnreachable,
    label_map_from_info,
    normalize_url,
)

logger = logging.getLogger(__name__)

MAX_HISTORY = 10


# =================================================================================================== errors


class UnknownSegmentsError(LabelLoopError):
    """The segmentation has segments whose names the server does not know."""

    def __init__(self, names: Sequence[str], known: Sequence[str]):
        self.names = list(names)
        self.known = list(known)
        listed = ", ".join(repr(n) for n in self.names)
        super().__init__(
            f"The server does not know these segments: {listed}. Its structures are: {', '.join(self.known)}. "
            "Rename the segments to one of these names, or submit with 'drop unknown segments'."
        )


class EmptyAnnotationError(LabelLoopError):
    """Nothing to submit: no voxel belongs to a structure the server knows."""


class NoSampleError(LabelLoopError):
    """There is no current image to work on."""


def describe_error(error: BaseException) -> str:
    """A sentence a person can act on, for any exception a job may end with."""
    if isinstance(error, ServerUnreachable):
        return str(error)
    if isinstance(error, ServerError):
        if error.status_code == 404:
            return f"Not found on the server: {error.message}"
        if error.status_code == 409:
            return f"The server cannot do this now: {error.message}"
        if error.status_code == 429:
            return f"The server is busy: {error.message}"
        if 400 <= error.status_code < 500:
            return f"The server refused the request (HTTP {error.status_code}): {error.message}"
        return f"The server failed (HTTP {error.status_code}): {error.message}"
    if isinstance(error, (LabelLoopError, segio.SegmentationFileError)):
        return str(error)
    if isinstance(error, ImportError):
        return f"A Python package is missing: {error}"
    if isinstance(error, OSError):
        return f"File error: {error}"
    return f"{type(error).__name__}: {error}"


# =================================================================================================== jobs


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(Exception):
    """Raised inside a job (by :meth:`JobContext.check_cancelled`) to stop it cooperatively."""


class JobBusy(RuntimeError):
    """A job with the same name is still running."""


@dataclass
class JobMessage:
    text: str
    fraction: Optional[float] = None
    time: float = field(default_factory=time.time)


class JobContext:
    """What a running job sees: its cancel event and a thread-safe progress channel."""

    def __init__(self, job: BackgroundJob):
        self._job = job

    @property
    def cancel_event(self) -> threading.Event:
        return self._job.cancel_event

    @property
    def cancelled(self) -> bool:
        return self._job.cancel_event.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`JobCancelled` when cancel was requested (call it in long loops)."""
        if self._job.cancel_event.is_set():
            raise JobCancelled(self._job.name)

    def progress(self, text: str, fraction: Optional[float] = None) -> None:
        self._job.messages.put(JobMessage(text, fraction))


class BackgroundJob:
    """A callable ``fn(context)`` run in a daemon thread, with state, result or error, progress and cancel.

    Cancel is cooperative: the event is set and ``fn`` is expected to notice it (``context.check_cancelled()``,
    or pass ``context.cancel_event`` to the client's downloads). A job that finishes after cancel was requested
    is reported as cancelled and its result is discarded.
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[JobContext], Any],
        on_done: Optional[Callable[[Any], None]] = None,
        on_failed: Optional[Callable[[BaseException], None]] = None,
        on_progress: Optional[Callable[[JobMessage], None]] = None,
        on_cancelled: Optional[Callable[[], None]] = None,
    ):
        self.name = name
        self.fn = fn
        self.on_done = on_done
        self.on_failed = on_failed
        self.on_progress = on_progress
        self.on_cancelled = on_cancelled
        self.cancel_event = threading.Event()
        self.messages: queue.Queue[JobMessage] = queue.Queue()
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.traceback: str = ""
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None
        self._state = JobState.PENDING
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.reported = False

    def __repr__(self) -> str:
        return f"BackgroundJob({self.name!r}, {self.state.value})"

    @property
    def state(self) -> JobState:
        with self._lock:
            return self._state

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    @property
    def elapsed(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.finished_at or time.time()) - self.started_at

    def start(self) -> BackgroundJob:
        with self._lock:
            if self._state != JobState.PENDING or self._thread is not None:
                return self
            self._thread = threading.Thread(target=self._run, name=f"LabelLoop-{self.name}", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Request cancel; a job that has not started yet is cancelled at once."""
        self.cancel_event.set()
        with self._lock:
            if self._state == JobState.PENDING and self._thread is None:
                self._state = JobState.CANCELLED
                self.finished_at = time.time()
                self._finished.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until finished (tests, shutdown); ``True`` when finished."""
        return self._finished.wait(timeout)

    def drain(self) -> List[JobMessage]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def _set(self, state: JobState) -> None:
        with self._lock:
            self._state = state

    def _run(self) -> None:
        self.started_at = time.time()
        self._set(JobState.RUNNING)
        try:
            if self.cancel_event.is_set():
                raise JobCancelled(self.name)
            result = self.fn(JobContext(self))
            if self.cancel_event.is_set():
                self._set(JobState.CANCELLED)
            else:
                self.result = result
                self._set(JobState.DONE)
        except (JobCancelled, OperationCancelled):
            self._set(JobState.CANCELLED)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            if self.cancel_event.is_set():
                self._set(JobState.CANCELLED)
            else:
                self.error = e
                self.traceback = traceback.format_exc()
                self._set(JobState.FAILED)
        finally:
            self.finished_at = time.time()
            self._finished.set()


class JobRunner:
    """Starts background jobs and, from :meth:`poll` (called on the main thread), delivers their progress
    and results to the callbacks given at :meth:`submit` - so callbacks may touch widgets and nodes."""

    def __init__(self) -> None:
        self._jobs: List[BackgroundJob] = []
        self._lock = threading.Lock()

    def submit(
        self,
        name: str,
        fn: Callable[[JobContext], Any],
        on_done: Optional[Callable[[Any], None]] = None,
        on_failed: Optional[Callable[[BaseException], None]] = None,
        on_progress: Optional[Callable[[JobMessage], None]] = None,
        on_cancelled: Optional[Callable[[], None]] = None,
        exclusive: bool = True,
    ) -> BackgroundJob:
        """Start ``fn(context)`` in a thread; with ``exclusive`` a second job of the same name raises JobBusy."""
        job = BackgroundJob(name, fn, on_done, on_failed, on_progress, on_cancelled)
        with self._lock:
            if exclusive and any(j.name == name and not j.finished for j in self._jobs):
                raise JobBusy(f"{name} is still running")
            self._jobs.append(job)
        return job.start()

    def jobs(self, name: Optional[str] = None) -> List[BackgroundJob]:
        with self._lock:
            return [j for j in self._jobs if name is None or j.name == name]

    def is_running(self, name: Optional[str] = None) -> bool:
        return any(not j.finished for j in self.jobs(name))

    def cancel(self, name: Optional[str] = None) -> int:
        """Request cancel of the unfinished jobs (of ``name``, or all); returns how many."""
        count = 0
        for job in self.jobs(name):
            if not job.finished:
                job.cancel()
                count += 1
        return count

    def poll(self) -> List[BackgroundJob]:
        """Deliver progress messages and results of finished jobs to their callbacks, on the calling thread.

        Returns the jobs that finished in this call. An exception raised by a callback does not stop the
        delivery to the other jobs; the first one is re-raised at the end.
        """
        finished: List[BackgroundJob] = []
        first_error: Optional[BaseException] = None
        for job in self.jobs():
            is_finished = job.finished  # read before draining, so that no message is left behind
            for message in job.drain():
                if job.on_progress is not None:
                    try:
                        job.on_progress(message)
                    except Exception as e:  # noqa: BLE001
                        logger.exception("progress callback of %s failed", job.name)
                        first_error = first_error or e
            if not is_finished or job.reported:
                continue
            job.reported = True
            finished.append(job)
            with self._lock:
                if job in self._jobs:
                    self._jobs.remove(job)
            try:
                if job.state == JobState.DONE and job.on_done is not None:
                    job.on_done(job.result)
                elif job.state == JobState.FAILED:
                    if job.on_failed is not None:
                        job.on_failed(job.error)  # type: ignore[arg-type]
                    else:
                        logger.error("%s failed: %s", job.name, job.traceback)
                elif job.state == JobState.CANCELLED and job.on_cancelled is not None:
                    job.on_cancelled()
            except Exception as e:  # noqa: BLE001
                logger.exception("callback of %s failed", job.name)
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return finished

    def wait_all(self, timeout: Optional[float] = None) -> bool:
        deadline = None if timeout is None else time.time() + timeout
        for job in self.jobs():
            remaining = None if deadline is None else max(0.0, deadline - time.time())
            if not job.wait(remaining):
                return False
        return True


# =================================================================================================== settings


def parse_history(value: Any) -> List[str]:
    """Server URL history from a stored setting: a JSON list, a Python list, or text with one URL per line
    (commas and semicolons also separate). Invalid entries are dropped, duplicates removed, order kept."""
    if value is None:
        return []
    items: List[Any]
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        text = str(value).strip()
        if not text:
            return []
        try:
            loaded = json.loads(text)
        except ValueError:
            loaded = None
        if isinstance(loaded, list):
            items = loaded
        elif isinstance(loaded, str):
            items = [loaded]
        else:
            items = [v for v in re.split(r"[\n,;]+", text)]
    out: List[str] = []
    for item in items:
        try:
            url = normalize_url(str(item))
        except ValueError:
            continue
        if url not in out:
            out.append(url)
    return out[:MAX_HISTORY]


def update_history(history: Iterable[str], url: str, max_items: int = MAX_HISTORY) -> List[str]:
    """``url`` (normalized) first, then the earlier entries without it; at most ``max_items``."""
    first = normalize_url(url)
    rest = [u for u in parse_history(list(history)) if u != first]
    return [first, *rest][: max(1, int(max_items))]


def serialize_history(history: Iterable[str]) -> str:
    """The history as a JSON list (safe in ``QSettings`` on every platform)."""
    return json.dumps(parse_history(list(history)))


# =================================================================================================== server info


@dataclass
class ModelInfo:
    name: str
    type: str
    labels: Dict[str, int]
    trained: Optional[bool] = None
    model_version: str = ""
    description: str = ""
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> List[str]:
        """Label names ordered by value (the class order of a classification model)."""
        return [n for n, _ in sorted(self.labels.items(), key=lambda kv: kv[1])]


@dataclass
class DatastoreProgress:
    total: int = 0
    completed: int = 0
    label_tags: Dict[str, int] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.completed / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"{self.completed}/{self.total} images labeled"

    @classmethod
    def from_json(cls, data: Optional[Mapping[str, Any]]) -> DatastoreProgress:
        data = data or {}
        tags = data.get("label_tags") or {}
        return cls(
            int(data.get("total") or 0), int(data.get("completed") or 0), {str(k): int(v) for k, v in tags.items()}
        )


@dataclass
class TrainingProgress:
    """A snapshot of training: the task's state plus the latest epoch statistics of the current run.

    ``state`` is ``idle`` (no task yet), ``running``, ``done``, ``failed`` or ``stopped``. ``dice`` holds the
    per-structure Dice (validation when there is a validation set, else training); ``metrics`` a classification
    trainer's accuracy, balanced accuracy and ROC AUC, named with the set they were measured on
    (``val accuracy``); ``history`` is one entry per finished epoch (``epoch`` and the :data:`CURVE_COLUMNS`) for a
    learning curve.
    """

    state: str = "idle"
    epoch: int = 0
    total_epochs: int = 0
    loss: Optional[float] = None
    mean_dice: Optional[float] = None
    dice: Dict[str, Optional[float]] = field(default_factory=dict)
    metrics: Dict[str, float] = field(default_factory=dict)
    max_minutes: float = 0.0
    elapsed_seconds: Optional[float] = None
    until_budget: bool = False
    best_metric: Optional[float] = None
    history: List[Dict[str, Any]] = field(default_factory=list)
    details: List[str] = field(default_factory=list)
    run_id: str = ""
    task_status: str = ""
    fresh: bool = False

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def fraction(self) -> float:
        """How far the run is: by its time budget when only that ends it, else by its epochs."""
        if self.until_budget and self.max_minutes > 0:
            return min(1.0, (self.elapsed_seconds or 0.0) / (60.0 * self.max_minutes))
        return min(1.0, self.epoch / self.total_epochs) if self.total_epochs else 0.0

    def counts(self) -> Tuple[int, int, str]:
        """A progress bar's done and total, and their unit: seconds when only the time budget ends the run, else
        epochs (total 0 while unknown)."""
        if self.until_budget and self.max_minutes > 0:
            total = max(1, round(60 * self.max_minutes))
            return min(round(self.elapsed_seconds or 0), total), total, "s"
        return self.epoch, self.total_epochs, "epoch"

    def position(self) -> List[str]:
        """Where the run is, in words: ``epoch 5/30``, or ``epoch 171`` when only the time budget ends it, then
        ``9.8/10 min`` when it has one."""
        parts = []
        if self.total_epochs:
            parts.append(f"epoch {self.epoch}" if self.until_budget else f"epoch {self.epoch}/{self.total_epochs}")
        if self.max_minutes > 0 and self.elapsed_seconds is not None:
            parts.append(f"{self.elapsed_seconds / 60:.1f}/{self.max_minutes:g} min")
        return parts

    def scores(self) -> List[str]:
        """How good the run's model is, in words: its mean Dice, or a classifier's accuracy, balanced accuracy and
        ROC AUC."""
        dice = [f"mean Dice {self.mean_dice:.3f}"] if self.mean_dice is not None else []
        return dice + [f"{name} {value:.3f}" for name, value in self.metrics.items()]

    def table(self) -> Tuple[List[str], List[Tuple[str, Optional[float]]]]:
        """The panel's table of the run: its headers and rows, Dice per structure or a classifier's metrics."""
        if self.metrics and not self.dice:
            return ["Metric", "Value"], [(name, value) for name, value in self.metrics.items()]
        return ["Structure", "Dice"], list(self.dice.items())

    def summary(self) -> str:
        if self.state == "idle":
            return "No training yet"
        parts = [self.state.capitalize(), *self.position()]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        parts += self.scores()
        if self.state == "failed" and self.details:
            parts.append(self.details[-1])
        return " | ".join(parts)


@dataclass
class ServerInfo:
    """The parts of ``/info/`` the workflow needs."""

    name: str
    version: str
    labels: Dict[str, int]
    models: Dict[str, ModelInfo]
    trainers: List[str]
    strategies: List[str]
    datastore: DatastoreProgress
    train_stats: Dict[str, Dict[str, Any]]
    raw: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> ServerInfo:
        models = {}
        for name, m in (info.get("models") or {}).items():
            m = m or {}
            models[str(name)] = ModelInfo(
                name=str(name),
                type=str(m.get("type", "")).lower(),
                labels=label_map_from_info({"models": {name: m}, "labels": info.get("labels")}, name),
                trained=m.get("trained"),
                model_version=str(m.get("model_version") or ""),
                description=str(m.get("description") or ""),
                config=dict(m.get("config") or {}),
            )
        labels = label_map_from_info(info) if models else label_map_from_info({"labels": info.get("labels")})
        return cls(
            name=str(info.get("name", "")),
            version=str(info.get("version", "")),
            labels=labels,
            models=models,
            trainers=list((info.get("trainers") or {}).keys()),
            strategies=list((info.get("strategies") or {}).keys()),
            datastore=DatastoreProgress.from_json(info.get("datastore")),
            train_stats={str(k): dict(v or {}) for k, v in (info.get("train_stats") or {}).items()},
            raw=dict(info),
        )

    def model_of_type(self, kind: str) -> Optional[ModelInfo]:
        return next((m for m in self.models.values() if m.type == kind), None)

    @property
    def segmentation_model(self) -> Optional[ModelInfo]:
        return self.model_of_type("segmentation")

    @property
    def classification_model(self) -> Optional[ModelInfo]:
        return self.model_of_type("classification")

    def metrics_summary(self, model: Optional[str] = None) -> str:
        """One line on the current model: trained or not, version, best/last Dice."""
        name = model or (self.segmentation_model.name if self.segmentation_model else "")
        m = self.models.get(name)
        if m is None:
            return "no segmentation model"
        if m.trained is False:
            return f"{name}: not trained yet"
        progress = training_from_stats(self.train_stats.get(name, {}), list(m.labels))
        parts = [f"{name}" + (f" (version {m.model_version})" if m.model_version else "")]
        if progress.metrics:  # a classifier: its best_metric is a score of its own, not a Dice
            return " | ".join(parts + progress.scores())
        if progress.best_metric is not None:
            parts.append(f"best Dice {progress.best_metric:.3f}")
        if progress.dice:
            parts.append(", ".join(f"{k} {v:.2f}" for k, v in progress.dice.items() if v is not None))
        return " | ".join(parts)


def _float(value: Any) -> Optional[float]:
    try:
        if value is None:
            return None
        out = float(value)
        return out if out == out else None  # NaN -> None
    except (TypeError, ValueError):
        return None


def train_params(epochs: int = 0, minutes: float = 0.0) -> Dict[str, Any]:
    """A training request from the panel's fields, 0 meaning unset: ``max_epochs`` and ``max_minutes``. With minutes
    alone the server trains until the budget ends; with both, whichever comes first ends the run."""
    params: Dict[str, Any] = {}
    if epochs > 0:
        params["max_epochs"] = int(epochs)
    if minutes > 0:
        params["max_minutes"] = float(minutes)
    return params


QUEUE_HEADERS = ["#", "image", "score", "model", "lease"]


def queue_table(answer: Mapping[str, Any]) -> Tuple[List[List[str]], str]:
    """The ranked queue (``GET /labelloop/queue``) for people: one row per image under :data:`QUEUE_HEADERS`, the
    next images in rank order, then the images leased now (who holds each and for how long), and a line that says
    what the queue is: the strategy, the model, how many images are available, and a fallback to random with why."""

    def score(item: Mapping[str, Any]) -> str:
        value = _float(item.get("score"))
        return "-" if value is None else f"{item.get('score_name') or 'score'} {value:.4g}"

    def held(lease: Mapping[str, Any]) -> str:
        minutes = (_float(lease.get("expires_in")) or 0.0) / 60.0
        return f"{lease.get('client_id') or '?'}, {minutes:.0f} min left"

    rows = [
        [str(item.get("rank", "")), str(item.get("id", "")), score(item), str(item.get("model_version") or "-"), ""]
        for item in answer.get("items") or []
    ]
    for item in answer.get("leased") or []:
        version = (item.get("scores") or {}).get("model_version") or "-"
        rows.append(["leased", str(item.get("id", "")), "-", str(version), held(item.get("lease") or {})])
    line = (
        f"{answer.get('strategy', '?')} queue, model {answer.get('current_model_version') or 'none yet'}: "
        f"{answer.get('available', 0)} of {answer.get('unlabeled', 0)} unlabeled images available"
    )
    if answer.get("fallback"):
        line += f"; falls back to {answer['fallback']}: {answer.get('reason', '')}"
    return rows, line


CLASSIFICATION_METRICS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("auc", "ROC AUC"))
"""The image-level metrics of a classification trainer's stats shown with its progress: stats key, name."""


def training_from_stats(stats: Mapping[str, Any], label_names: Sequence[str] = ()) -> TrainingProgress:
    """Epoch, loss and Dice from a trainer's ``train_stats`` (LabelLoop's history-enriched form, or MONAI
    Label's plain one)."""
    stats = stats or {}
    progress = TrainingProgress(state="idle")
    if not stats:
        return progress
    progress.epoch = int(stats.get("epoch") or stats.get("current_epoch") or 0)
    progress.total_epochs = int(stats.get("total_epochs") or stats.get("max_epochs") or 0)
    progress.loss = _float(stats.get("loss"))
    progress.max_minutes = _float(stats.get("max_minutes")) or 0.0
    progress.elapsed_seconds = _float(stats.get("elapsed_seconds"))
    progress.until_budget = bool(stats.get("until_budget"))
    progress.best_metric = _float(stats.get("best_metric"))
    progress.run_id = str(stats.get("run_id") or "")
    mean = _float(stats.get("val_mean_dice"))
    if mean is None:
        mean = _float(stats.get("train_mean_dice"))
    dice = stats.get("val_dice") or stats.get("train_dice")
    if not dice:
        metrics = (stats.get("eval") or {}).get("metrics") or (stats.get("train") or {}).get("metrics") or {}
        dice = {}
        for name in label_names:
            for key in (f"val_{name}_mean_dice", f"train_{name}_mean_dice", f"{name}_mean_dice", name):
                if key in metrics:
                    dice[name] = metrics[key]
                    break
        if mean is None:
            mean = _float(metrics.get("val_mean_dice") or metrics.get("train_mean_dice"))
    progress.mean_dice = mean
    progress.dice = {str(k): _float(v) for k, v in (dice or {}).items()}
    measured = "val" if any(f"val_{key}" in stats for key, _ in CLASSIFICATION_METRICS) else "train"
    for key, name in CLASSIFICATION_METRICS:
        value = _float(stats.get(f"{measured}_{key}"))
        if value is not None:
            progress.metrics[f"{measured} {name}"] = value
    progress.history = [
        {"epoch": int(entry.get("epoch") or 0), **{c: _float(entry.get(c)) for c in CURVE_COLUMNS}}
        for entry in stats.get("history") or []
        if isinstance(entry, Mapping)
    ]
    return progress


SEGMENTATION_CURVE = ("loss", "train_mean_dice", "val_mean_dice")
CLASSIFICATION_CURVE = ("loss", "train_auc", "val_auc", "val_balanced_accuracy")
CURVE_COLUMNS = tuple(dict.fromkeys(SEGMENTATION_CURVE + CLASSIFICATION_CURVE))
"""What a learning curve can plot per epoch: the loss, a segmentation trainer's mean Dice, a classifier's ROC AUC
and balanced accuracy."""


def curve_columns(history: Sequence[Mapping[str, Any]]) -> List[str]:
    """The learning curve's columns for ``history`` (:attr:`TrainingProgress.history`): a segmentation trainer's or
    a classifier's, by the metrics it records. They stay the same all through a run, also while an epoch's metric is
    undefined (a gap in the curve), so that a chart already shown is not replaced."""
    recorded = {c for c in CURVE_COLUMNS[1:] if any(entry.get(c) is not None for entry in history)}
    for curve in (SEGMENTATION_CURVE, CLASSIFICATION_CURVE):
        if recorded & set(curve):
            return list(curve)
    return ["loss"]


def curve_axis_title(columns: Sequence[str]) -> str:
    """The y axis of a learning curve of ``columns``: ``loss / Dice`` or ``loss / ROC AUC, balanced accuracy``."""
    if any(c.endswith("mean_dice") for c in columns):
        return "loss / Dice"
    return "loss / ROC AUC, balanced accuracy" if len(columns) > 1 else "loss"


_TASK_STATES = {"SUBMITTED": "running", "RUNNING": "running", "DONE": "done", "ERROR": "failed", "STOPPED": "stopped"}


@dataclass
class BatchProgress:
    state: str = "idle"
    task_status: str = ""
    details: List[str] = field(default_factory=list)
    labeled_by_model: int = 0
    total: int = 0

    def summary(self) -> str:
        if self.state == "idle":
            return "No batch inference yet"
        text = f"{self.state.capitalize()}: {self.labeled_by_model}/{self.total} images have a model label"
        if self.state == "failed" and self.details:
            text += f" | {self.details[-1]}"
        return text


@dataclass
class ClassificationResult:
    predicted: Optional[str]
    probabilities: Dict[str, float]
    raw: Dict[str, Any]
    explanation_path: Optional[str] = None
    """The explanation map (float NIfTI in [0, 1] on the image's grid), when one was asked for."""

    def explanation_name(self, image_id: str) -> str:
        """``<image> gradcam lesion``: what the map shows, to name it where it is overlaid."""
        about = self.raw.get("explanation") or {}
        return " ".join(str(x) for x in (image_id, about.get("method"), about.get("class")) if x)


def parse_classification(result: Mapping[str, Any], classes: Sequence[str]) -> ClassificationResult:
    """Predicted class and per-class probabilities from a classification model's JSON answer.

    Accepts probabilities as a ``{class: p}`` mapping or a list in class order (keys ``probabilities``,
    ``probs``, ``scores``, ``prob``), and the prediction as a class name or index (``class``, ``prediction``,
    ``label``, ``pred``); without a prediction the most probable class is taken.
    """
    classes = list(classes)
    probs: Dict[str, float] = {}
    raw_probs = next((result[k] for k in ("probabilities", "probs", "scores", "prob") if k in result), None)
    if isinstance(raw_probs, Mapping):
        probs = {str(k): float(v) for k, v in raw_probs.items()}
    elif isinstance(raw_probs, (list, tuple)):
        values = list(raw_probs)
        if values and isinstance(values[0], (list, tuple)):
            values = list(values[0])
        names = classes if len(classes) == len(values) else [str(i) for i in range(len(values))]
        probs = {n: float(v) for n, v in zip(names, values)}
    predicted_raw = next((result[k] for k in ("class", "prediction", "label", "pred") if k in result), None)
    predicted: Optional[str] = None
    if isinstance(predicted_raw, (list, tuple)) and predicted_raw:
        predicted_raw = predicted_raw[0]
    if isinstance(predicted_raw, bool):
        predicted_raw = int(predicted_raw)
    if isinstance(predicted_raw, int) and 0 <= predicted_raw < len(classes):
        predicted = classes[predicted_raw]
    elif isinstance(predicted_raw, str) and predicted_raw:
        predicted = predicted_raw
    if predicted is None and probs:
        predicted = max(probs.items(), key=lambda kv: kv[1])[0]
    return ClassificationResult(predicted, probs, dict(result))


# =================================================================================================== session


@dataclass
class Sample:
    image_id: str
    path: str
    info: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """Why this image, in words, from the strategy's answer (``info``): its score and the model that scored it,
        or the strategy's fallback to random and why."""
        info = self.info
        strategy = (info.get("lease") or {}).get("strategy") or "the strategy"
        if info.get("chosen"):
            return f"{self.image_id} (chosen from the {strategy} queue)"
        fallback = fallback_note(info, strategy)
        if fallback:
            return f"{self.image_id} ({fallback})"
        score = _float(info.get("score"))
        if score is None:
            return self.image_id
        model = f", model {info['model_version']}" if info.get("model_version") else ""
        return f"{self.image_id} ({info.get('score_name') or 'score'} {score:.4g}{model})"


def fallback_note(answer: Mapping[str, Any], strategy: str) -> str:
    """``<strategy> fell back to random: <why>`` when a strategy's answer says it did, else ``""``."""
    if not answer.get("fallback"):
        return ""
    return f"{strategy} fell back to {answer['fallback']}: {answer.get('reason', '')}"


@dataclass
class AutoSegmentation:
    image_id: str
    seg_path: str
    label_path: str
    segments: List[segio.SegmentInfo]
    unknown_values: List[int]
    result: Dict[str, Any]


@dataclass
class SubmitResult:
    image_id: str
    label_path: str
    voxels_per_name: Dict[str, int]
    dropped_names: List[str]
    overlap_voxels: int
    renamed: Dict[str, str]
    response: Dict[str, Any]
    next_sample: Optional[Sample] = None


def finding_from_ras(point_ras: Sequence[float], radius_mm: float) -> Dict[str, Any]:
    """A class label finding (the server's ``{"centre_lps": [x, y, z], "radius_mm": r}``) from a point in Slicer's
    RAS millimetres: LPS negates x and y."""
    x, y, z = (float(v) for v in point_ras)
    return {"centre_lps": [-x, -y, z], "radius_mm": float(radius_mm)}


def safe_file_stem(text: str) -> str:
    """A file-name-safe version of an id (ids normally are already)."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("._")
    return stem or "image"


def default_cache_dir(server_url: str) -> str:
    digest = hashlib.sha1(server_url.encode("utf-8")).hexdigest()[:10]
    return os.path.join(tempfile.gettempdir(), "LabelLoop", digest)


class AnnotationSession:
    """One annotator's session with a server. Methods block (run them in a :class:`JobRunner` job from a UI).

    Files (downloaded images, pre-segmentations, submitted label maps) go to ``cache_dir``.
    """

    def __init__(
        self,
        client: LabelLoopClient,
        cache_dir: Optional[str] = None,
        color_of: Callable[[str], colormod.RGB] = colormod.color_for,
    ):
        self.client = client
        self.cache_dir = cache_dir or default_cache_dir(client.server_url)
        self.color_of = color_of
        self.server: Optional[ServerInfo] = None
        self.current: Optional[Sample] = None
        self._lock = threading.Lock()
        self._previous_run: Dict[str, str] = {}
        self._samples: Dict[str, Sample] = {}

    # ------------------------------------------------------------------------------------------- paths

    def _dir(self, kind: str) -> str:
        path = os.path.join(self.cache_dir, kind)
        os.makedirs(path, exist_ok=True)
        return path

    # ------------------------------------------------------------------------------------------- info

    def connect(self) -> ServerInfo:
        """Fetch ``/info/``: structures, models, strategies, datastore progress, training stats."""
        info = ServerInfo.from_info(self.client.info())
        with self._lock:
            self.server = info
        return info

    def _server(self) -> ServerInfo:
        return self.server or self.connect()

    @property
    def label_map(self) -> Dict[str, int]:
        """The segmentation structures ``{name: value}`` (``{}`` before :meth:`connect`)."""
        server = self.server
        if server is None:
            return {}
        model = server.segmentation_model
        return dict(model.labels if model else server.labels)

    def segmentation_model_name(self, model: Optional[str] = None) -> str:
        if model:
            return model
        m = self._server().segmentation_model
        if m is None:
            raise LabelLoopError("the server offers no segmentation model")
        return m.name

    def progress(self) -> DatastoreProgress:
        """Labeled/total images, straight from the datastore."""
        return DatastoreProgress.from_json(self.client.datastore_status())

    def label_info(self) -> List[Dict[str, Any]]:
        """``[{"name", "idx", "color"}]`` of every structure, as stored with submitted labels."""
        return [
            {"name": n, "idx": int(v), "color": list(colormod.to_255(self.color_of(n)))}
            for n, v in sorted(self.label_map.items(), key=lambda kv: kv[1])
        ]

    # ------------------------------------------------------------------------------------------- samples

    def next_sample(
        self,
        strategy: str = "random",
        params: Optional[Mapping[str, Any]] = None,
        cancel: Optional[threading.Event] = None,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> Optional[Sample]:
        """Ask the strategy for the next image and download it; ``None`` when no image is left to label."""
        answer = self.client.next_sample(strategy, params)
        image_id = answer.get("id") if isinstance(answer, dict) else None
        if not image_id:
            return None
        return self.fetch_image(str(image_id), answer, cancel=cancel, progress=progress)

    def take_sample(
        self,
        image_id: str,
        strategy: str = "random",
        cancel: Optional[threading.Event] = None,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> Sample:
        """Lease the image the annotator chose (a row of the queue) and download it, as :meth:`next_sample` does for
        the strategy's own pick; the server refuses an image already labeled or leased to someone else."""
        answer = self.client.take_image(image_id, strategy)
        return self.fetch_image(image_id, answer, cancel=cancel, progress=progress)

    def fetch_image(
        self,
        image_id: str,
        info: Optional[Mapping[str, Any]] = None,
        cancel: Optional[threading.Event] = None,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> Sample:
        """Download image ``image_id`` into the cache (always fresh) and make it the current sample."""
        sample = self._download(image_id, info, cancel, progress)
        with self._lock:
            self.current = sample
        return sample

    def _download(
        self,
        image_id: str,
        info: Optional[Mapping[str, Any]] = None,
        cancel: Optional[threading.Event] = None,
        progress: Optional[Callable[[int, Optional[int]], None]] = None,
    ) -> Sample:
        folder = os.path.join(self._dir("images"), safe_file_stem(image_id))
        os.makedirs(folder, exist_ok=True)
        path = self.client.download_image(image_id, folder + os.sep, cancel=cancel, progress=progress)
        sample = Sample(image_id, path, dict(info or {}))
        with self._lock:
            self._samples[image_id] = sample
        return sample

    def image_path(self, image_id: str) -> str:
        """The cached image file of ``image_id`` (downloaded when missing; the current sample is unchanged)."""
        sample = self._samples.get(image_id)
        if sample is not None and os.path.isfile(sample.path):
            return sample.path
        return self._download(image_id).path

    def _image_id(self, image_id: Optional[str]) -> str:
        if image_id:
            return image_id
        if self.current is None:
            raise NoSampleError("no current image: fetch a sample first")
        return self.current.image_id

    def upload_image(
        self, path: str, image_id: Optional[str] = None, params: Optional[Mapping[str, Any]] = None
    ) -> str:
        """Add an image file to the server's datastore; returns its id."""
        return self.client.upload_image(path, image_id=image_id, params=params)

    # ------------------------------------------------------------------------------------------- segmentations

    def _write_segmentation(
        self, image_id: str, labelmap: Any, geometry: segio.Geometry, names: Mapping[str, int], suffix: str
    ) -> Tuple[str, List[segio.SegmentInfo], List[int]]:
        segments, unknown_values = segio.segments_from_labelmap(labelmap, names, self.color_of)
        clean = segio.clear_values(labelmap, unknown_values)
        seg_path = os.path.join(self._dir("segmentations"), f"{safe_file_stem(image_id)}{suffix}.seg.nrrd")
        segio.write_seg_nrrd(seg_path, clean, geometry, segments)
        return seg_path, segments, unknown_values

    def auto_segment(
        self, image_id: Optional[str] = None, model: Optional[str] = None, params: Optional[Mapping[str, Any]] = None
    ) -> AutoSegmentation:
        """Run the segmentation model on the image and write its result as named, colored segments.

        Values of the result that name no structure are left out and reported in ``unknown_values``.
        """
        image_id = self._image_id(image_id)
        model = self.segmentation_model_name(model)
        label_path, result = self.client.infer(
            model, image_id=image_id, params=params, out_path=self._dir("results") + os.sep
        )
        if label_path is None:
            raise LabelLoopError(f"model {model!r} returned no label map")
        labelmap, geometry = segio.read_labelmap(label_path)
        names = result.get("label_names") if isinstance(result.get("label_names"), dict) else None
        names = {str(k): int(v) for k, v in (names or self.label_map).items()}
        image = self._samples.get(image_id)
        if image is not None and os.path.isfile(image.path):
            shape, image_geometry = segio.read_image_geometry(image.path)
            if tuple(shape) == tuple(labelmap.shape) and image_geometry.same_axes(geometry):
                geometry = image_geometry  # the image's exact numbers, so Slicer sees one grid
        seg_path, segments, unknown = self._write_segmentation(image_id, labelmap, geometry, names, "_auto")
        if unknown:
            logger.warning("model %s returned values %s that name no structure; left out", model, unknown)
        return AutoSegmentation(image_id, seg_path, label_path, segments, unknown, result)

    def empty_segmentation(self, image_id: Optional[str] = None) -> str:
        """A segmentation with one empty segment per structure (name, color) on the image's grid."""
        image_id = self._image_id(image_id)
        shape, geometry = segio.read_image_geometry(self.image_path(image_id))
        labelmap = np.zeros(shape, dtype=np.uint8)
        seg_path, _, _ = self._write_segmentation(image_id, labelmap, geometry, self.label_map, "_new")
        return seg_path

    # ------------------------------------------------------------------------------------------- submit

    def build_labelmap(
        self, path: str, image_path: str, drop_unknown: bool = False
    ) -> Tuple[segio.LabelMapBuild, segio.Geometry]:
        """The server label map of a ``.seg.nrrd`` (by segment name) or of a label map file, on the image grid."""
        names = self.label_map
        if not names:
            self._server()
            names = self.label_map
        shape, geometry = segio.read_image_geometry(image_path)
        if is_segmentation_file(path):
            data = segio.read_seg_nrrd(path)
        else:
            data = labelmap_as_segmentation(path, names)
        if data.shape != tuple(shape) or not _same_grid(data.geometry, geometry):
            data = segio.place_on_grid(data, shape, geometry)
        build = segio.build_labelmap(data, names)
        if build.unknown_names and not drop_unknown:
            raise UnknownSegmentsError(build.unknown_names, list(names))
        return build, geometry

    def submit(
        self,
        path: str,
        image_id: Optional[str] = None,
        drop_unknown: bool = False,
        allow_empty: bool = False,
        load_next: bool = False,
        strategy: str = "random",
        tag: str = "final",
        cancel: Optional[threading.Event] = None,
    ) -> SubmitResult:
        """Store the annotation of ``image_id`` as its ``final`` label, converted by segment name.

        ``path`` is a ``.seg.nrrd`` (segments matched by name) or a label map already in the server's values.
        Unknown segment names raise :class:`UnknownSegmentsError` unless ``drop_unknown``; an annotation with no
        known voxel raises :class:`EmptyAnnotationError` unless ``allow_empty``. With ``load_next`` the next
        sample is fetched afterwards and returned in ``next_sample``.
        """
        image_id = self._image_id(image_id)
        image_path = self.image_path(image_id)
        build, geometry = self.build_labelmap(path, image_path, drop_unknown=drop_unknown)
        if not allow_empty and not build.labelmap.any():
            raise EmptyAnnotationError(
                "the annotation is empty: no voxel belongs to a structure the server knows "
                f"({', '.join(self.label_map)})"
            )
        label_path = os.path.join(self._dir("labels"), f"{safe_file_stem(image_id)}.nii.gz")
        segio.write_labelmap(label_path, build.labelmap, geometry, reference_image=image_path)
        extra: Dict[str, Any] = {"client": "LabelLoop"}
        if build.unknown_names:
            extra["dropped_segments"] = list(build.unknown_names)
        response = self.client.save_label(image_id, label_path, tag=tag, label_info=self.label_info(), params=extra)
        result = SubmitResult(
            image_id=image_id,
            label_path=label_path,
            voxels_per_name=build.voxels_per_name,
            dropped_names=list(build.unknown_names),
            overlap_voxels=build.overlap_voxels,
            renamed=build.matched,
            response=response,
        )
        if load_next:
            result.next_sample = self.next_sample(strategy, cancel=cancel)
        return result

    # ------------------------------------------------------------------------------------------- classification

    def classify(
        self,
        image_id: Optional[str] = None,
        model: Optional[str] = None,
        explain: Optional[str] = None,
        explain_class: Optional[str] = None,
        out_path: Optional[str] = None,
    ) -> ClassificationResult:
        """Run the classification model on the image: predicted class and probabilities, and with ``explain`` (one
        of :data:`EXPLAIN_METHODS`) a map of where the model saw ``explain_class`` (default: the predicted class),
        written to ``out_path`` (default: the session's results folder)."""
        image_id = self._image_id(image_id)
        server = self._server()
        m = server.models.get(model) if model else server.classification_model
        if m is None:
            raise LabelLoopError("the server offers no classification model")
        if explain is not None and explain not in EXPLAIN_METHODS:
            raise LabelLoopError(f"unknown explanation {explain!r}; choose from {', '.join(EXPLAIN_METHODS)}")
        if explain_class is not None and explain_class not in m.classes:
            raise LabelLoopError(f"unknown class {explain_class!r}; classes: {', '.join(m.classes)}")
        params = {k: v for k, v in (("explain", explain), ("explain_class", explain_class)) if v}
        target = out_path or os.path.join(self._dir("results"), f"{safe_file_stem(image_id)}_{explain or 'map'}.nii.gz")
        path, answer = self.client.infer(m.name, image_id=image_id, params=params, out_path=target)
        result = parse_classification(answer, m.classes)
        if explain and path is None:
            raise LabelLoopError(f"model {m.name!r} answered without an explanation map")
        result.explanation_path = path
        return result

    def submit_class(
        self,
        class_name: str,
        image_id: Optional[str] = None,
        model: Optional[str] = None,
        findings: Optional[Sequence[Mapping[str, Any]]] = None,
    ) -> Dict[str, Any]:
        """Store an image-level class as the image's ``class`` label (the server's convention, see the README's
        "Classification"): a small JSON file ``{"class": name}`` uploaded with ``label_info = {"class": name}``.
        The tag ``class`` keeps it apart from the ``final`` segmentation label, which the image may also have.
        ``findings`` (see :func:`finding_from_ras`) say where the class shows; ``None`` sends none."""
        image_id = self._image_id(image_id)
        server = self._server()
        m = server.models.get(model) if model else server.classification_model
        if m is not None and m.classes and class_name not in m.classes:
            raise LabelLoopError(f"unknown class {class_name!r}; classes: {', '.join(m.classes)}")
        doc: Dict[str, Any] = {"class": class_name}
        if findings is not None:
            doc["findings"] = [dict(f) for f in findings]
        path = os.path.join(self._dir("labels"), f"{safe_file_stem(image_id)}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f)
        return self.client.save_label(image_id, path, tag="class", label_info=doc)

    # ------------------------------------------------------------------------------------------- training

    def train_start(self, model: Optional[str] = None, params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Start training; the statistics of earlier runs are ignored by :meth:`poll_training` from now on."""
        server = self._server()
        name = model or (server.trainers[0] if server.trainers else self.segmentation_model_name())
        info = self.client.info()
        previous = _run_stamp((info.get("train_stats") or {}).get(name) or {})
        with self._lock:
            self._previous_run[name] = previous
        return self.client.train_start(name, params)

    def train_stop(self) -> Any:
        return self.client.train_stop()

    def poll_training(self, model: Optional[str] = None) -> TrainingProgress:
        """Task state plus the current run's epoch, loss, per-structure Dice and history."""
        server = self.server
        name = model or (server.trainers[0] if server and server.trainers else "segmentation")
        task = self.client.train_status()
        info = self.client.info()
        with self._lock:
            self.server = ServerInfo.from_info(info)
        stats = (info.get("train_stats") or {}).get(name) or {}
        labels = list(self.label_map)
        progress = training_from_stats(stats, labels)
        previous = self._previous_run.get(name)
        stamp = _run_stamp(stats)
        progress.fresh = previous is None or (bool(stamp) and stamp != previous)
        if not progress.fresh:
            progress = TrainingProgress()
        if isinstance(task, dict):
            status = str(task.get("status", "")).upper()
            progress.task_status = status
            progress.state = _TASK_STATES.get(status, status.lower() or "idle")
            progress.details = [str(d) for d in (task.get("details") or [])][-20:]
        else:
            progress.state = "idle" if not progress.fresh or not progress.epoch else "done"
        return progress

    # ------------------------------------------------------------------------------------------- batch inference

    def batch_infer_start(
        self, images: str = "unlabeled", model: Optional[str] = None, params: Optional[Mapping[str, Any]] = None
    ) -> Dict[str, Any]:
        """Infer all (or all unlabeled) images on the server; results are stored as ``original`` labels.

        ``multi_gpu`` is off unless ``params`` turn it on: MONAI Label 0.8.5 spreads the images over "all GPUs"
        by default, which fails on a server without any (it then has no device to use).
        """
        if images not in ("all", "unlabeled"):
            raise ValueError(f"images must be 'all' or 'unlabeled', got {images!r}")
        request = {"multi_gpu": False, **dict(params or {})}
        return self.client.batch_infer(self.segmentation_model_name(model), images=images, params=request)

    def batch_infer_stop(self) -> Any:
        return self.client.batch_infer_stop()

    def poll_batch(self) -> BatchProgress:
        task = self.client.batch_infer_status()
        stats = DatastoreProgress.from_json(self.client.datastore_status())
        progress = BatchProgress(labeled_by_model=stats.label_tags.get("original", 0), total=stats.total)
        if isinstance(task, dict):
            status = str(task.get("status", "")).upper()
            progress.task_status = status
            progress.state = _TASK_STATES.get(status, status.lower() or "idle")
            progress.details = [str(d) for d in (task.get("details") or [])][-20:]
        return progress


def _run_stamp(stats: Mapping[str, Any]) -> str:
    """What identifies a training run in its statistics: LabelLoop's ``run_id``, else MONAI Label's start time."""
    return str(stats.get("run_id") or stats.get("start_ts") or "")


def _same_grid(a: segio.Geometry, b: segio.Geometry) -> bool:
    return a.same_axes(b) and bool(np.allclose(a.origin, b.origin, atol=1e-3))


def is_segmentation_file(path: str) -> bool:
    """A ``.seg.nrrd``, or any NRRD whose header describes segments."""
    lower = path.lower()
    if lower.endswith((".seg.nrrd", ".seg.nhdr")):
        return True
    if not lower.endswith(".nrrd"):
        return False
    with open(path, "rb") as f:
        for raw in f:
            if not raw.strip():
                return False
            if raw.startswith(b"Segment0_ID:="):
                return True
    return False


def labelmap_as_segmentation(path: str, name_to_value: Mapping[str, int]) -> segio.SegmentationData:
    """A label map file in the server's values viewed as a segmentation (values no name maps to become
    segments named ``value N`` so that they are reported as unknown)."""
    labelmap, geometry = segio.read_labelmap(path)
    value_to_name = {int(v): n for n, v in name_to_value.items()}
    segments = []
    for value in sorted(int(v) for v in np.unique(labelmap) if v != 0):
        name = value_to_name.get(value, f"value {value}")
        segments.append(segio.SegmentInfo(name=name, label_value=value, id=f"Segment_{value}"))
    return segio.SegmentationData(labelmap[np.newaxis], segments, geometry, (0, 0, 0), labelmap.shape)


__all__ = [
    "AnnotationSession",
    "AutoSegmentation",
    "BackgroundJob",
    "BatchProgress",
    "ClassificationResult",
    "DatastoreProgress",
    "EmptyAnnotationError",
    "JobBusy",
    "JobCancelled",
    "JobContext",
    "JobMessage",
    "JobRunner",
    "JobState",
    "ModelInfo",
    "NoSampleError",
    "Sample",
    "ServerInfo",
    "SubmitResult",
    "TrainingProgress",
    "UnknownSegmentsError",
    "default_cache_dir",
    "describe_error",
    "fallback_note",
    "is_segmentation_file",
    "parse_classification",
    "curve_axis_title",
    "curve_columns",
    "parse_history",
    "serialize_history",
    "queue_table",
    "train_params",
    "training_from_stats",
    "update_history",
]
