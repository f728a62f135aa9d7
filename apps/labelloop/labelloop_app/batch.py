"""Server-side batch inference: the selected images through the app's own infer task, inside the server process.

MONAI Label 0.8.5 runs a batch in a subprocess that loads the model again and reads, computes and writes one
image after the other. LabelLoop runs it in background threads of the server instead:

* the model is loaded once (the infer task's own network cache) and stays loaded for the whole batch;
* a read-ahead thread runs the task's pre-transforms on the next image while the current one is computed, and a
  writer thread restores, writes and stores the previous result, so reading, computing and writing overlap;
* label maps are stored under the ``original`` tag, never ``final`` (a classification model's answers are kept in
  the batch's record); an image that cannot be read or inferred is recorded as failed with its message and the
  batch goes on;
* progress (done/total, the image in each stage, failures with their messages) can be read while it runs, and
  it can be cancelled: the network is interrupted between two sliding windows, not only between images;
* interactive inference requests come first: while one runs, the batch pauses between two network calls, so an
  annotator does not wait for the batch (no lock is held for the whole batch).

Only one batch runs at a time; starting a second one is a 409.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from fastapi import APIRouter, Depends, HTTPException
from monailabel.config import settings
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from labelloop_app.datastore import LabelLoopDatastore
from labelloop_app.errors import BadRequest, Conflict, NotFound, UnprocessableInput
from labelloop_app.geometry import UnreadableImageError
from labelloop_app.request_params import INFER_RULES, checked
from labelloop_app.torch_threads import INFERENCE_THREADS, use_inference_threads

logger = logging.getLogger(__name__)

SELECTIONS = ("all", "labeled", "unlabeled")
RUNNING = ("SUBMITTED", "RUNNING")
# MONAI Label's batch options that mean nothing here (one process, one device) and are not passed to the task.
_BATCH_ONLY_KEYS = (
    "images",
    "device",
    "label_tag",
    "save_label",
    "multi_gpu",
    "gpus",
    "max_workers",
    "max_batch_size",
    "model",
    "image",
    "prefetch",
    "workers",
    "run_sync",
)
_END = object()


class BatchCancelled(Exception):
    """Raised inside the batch's inference thread when the batch is cancelled."""


class InteractiveGate:
    """Counts the interactive inference requests in flight; a batch waits for them between two network calls.

    The wait happens only between sliding windows of the batch, so an annotator's request gets the CPU (or GPU)
    almost as if no batch were running, and the batch continues as soon as the request is answered.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0

    @property
    def active(self) -> int:
        with self._cond:
            return self._active

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Mark an interactive request as running for the duration of the ``with`` block."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def wait_idle(self, cancel: threading.Event, max_wait: float = 120.0) -> float:
        """Block while interactive requests run (at most ``max_wait`` s, or until ``cancel``); seconds waited."""
        start = time.monotonic()
        with self._cond:
            while self._active and not cancel.is_set():
                left = max_wait - (time.monotonic() - start)
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.2))
        return time.monotonic() - start


def _now() -> str:
    return datetime.today().strftime("%Y-%m-%d %H:%M:%S")


class BatchJob:
    """The state of one batch: read and written by the pipeline's threads under one lock, read by the API."""

    def __init__(self, model: str, selection: str, image_ids: List[str], device: str, request: Dict[str, Any]):
        self.id = str(uuid.uuid4())
        self.model = model
        self.selection = selection
        self.image_ids = image_ids
        self.device = device
        self.request = request
        self.status = "SUBMITTED"
        self.error = ""
        self.start_ts = _now()
        self.end_ts = ""
        self.started = time.time()
        self.finished: Optional[float] = None
        self._stages: Dict[str, Dict[int, str]] = {"reading": {}, "inferring": {}, "writing": {}}  # per thread
        self.stage_seconds: Dict[str, float] = {"read": 0.0, "infer": 0.0, "write": 0.0, "paused": 0.0}
        self.results: List[Dict[str, Any]] = []
        self.details: Deque[str] = deque(maxlen=20)
        self.cancel = threading.Event()
        self.done_event = threading.Event()
        self.lock = threading.Lock()

    # --------------------------------------------------------------------------------------------- updates

    def log(self, message: str, level: int = logging.INFO) -> None:
        logger.log(level, "batch %s: %s", self.id[:8], message)
        with self.lock:
            self.details.append(f"{_now()} {message}")

    def set_stage(self, stage: str, image_id: Optional[str]) -> None:
        """The calling thread starts (``image_id``) or ends (``None``) a stage; several workers may share one."""
        ident = threading.get_ident()
        with self.lock:
            if image_id is None:
                self._stages[stage].pop(ident, None)
            else:
                self._stages[stage][ident] = image_id

    @property
    def stages(self) -> Dict[str, Optional[str]]:
        """The image each stage is working on (the latest one when several workers are in the same stage)."""
        with self.lock:
            return {stage: (list(ids.values())[-1] if ids else None) for stage, ids in self._stages.items()}

    def add_seconds(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.stage_seconds[stage] += seconds

    def succeeded(self, image_id: str, seconds: float, result: Dict[str, Any], stored: bool = True) -> None:
        """One image done; a result that was not stored as a label (classification) is kept in the record."""
        entry = {
            "image": image_id,
            "ok": True,
            "seconds": round(seconds, 2),
            "model_version": str(result.get("model_version", "")),
            "stored": stored,
        }
        if not stored:
            entry["result"] = {k: v for k, v in result.items() if k not in ("latencies", "label_names", "centroids")}
        with self.lock:
            self.results.append(entry)
            n = len(self.results)
        where = f"stored as {DefaultLabelTag.ORIGINAL.value}" if stored else "result kept in the batch record"
        self.log(f"{n}/{len(self.image_ids)} {image_id}: {where} in {seconds:.1f} s")

    def failed(self, image_id: str, message: str) -> None:
        with self.lock:
            self.results.append({"image": image_id, "ok": False, "error": message})
            n = len(self.results)
        self.log(f"{n}/{len(self.image_ids)} {image_id} failed: {message}", logging.WARNING)

    def finish(self, status: str, error: str = "") -> None:
        with self.lock:
            self.status = status
            self.error = error
            self.end_ts = _now()
            self.finished = time.time()
            for ids in self._stages.values():
                ids.clear()
        self.log(f"{status.lower()}" + (f": {error}" if error else ""))
        self.done_event.set()

    # --------------------------------------------------------------------------------------------- reading

    @property
    def running(self) -> bool:
        with self.lock:
            return self.status in RUNNING

    def snapshot(self) -> Dict[str, Any]:
        """The job as JSON: MONAI Label's task record (``id``, ``status``, ``details``, ...) plus progress."""
        stages = self.stages
        with self.lock:
            done = len(self.results)
            failed = [{"image": r["image"], "error": r["error"]} for r in self.results if not r["ok"]]
            elapsed = (self.finished or time.time()) - self.started
            total = len(self.image_ids)
            rate = done / elapsed * 60.0 if elapsed > 0 and done else 0.0
            eta = (total - done) / (rate / 60.0) if rate and self.status in RUNNING else None
            return {
                "id": self.id,
                "kind": "batch_infer",
                "model": self.model,
                "status": self.status,
                "error": self.error,
                "images": self.selection,
                "total": total,
                "done": done,
                "succeeded": done - len(failed),
                "failed": failed,
                "pending": total - done,
                "current": stages["inferring"],
                "stages": stages,
                "cancel_requested": self.cancel.is_set(),
                "device": self.device,
                "label_tag": DefaultLabelTag.ORIGINAL.value,
                "start_ts": self.start_ts,
                "end_ts": self.end_ts,
                "elapsed_s": round(elapsed, 2),
                "images_per_minute": round(rate, 2),
                "eta_s": round(eta, 1) if eta is not None else None,
                "stage_seconds": {k: round(v, 2) for k, v in self.stage_seconds.items()},
                "results": [dict(r) for r in self.results],
                "details": list(self.details),
                "request": copy.deepcopy(self.request),
            }


def resolve_device(name: Any) -> Tuple[str, str]:
    """The torch device for a ``device`` request value, and a note when it falls back to the CPU.

    ``None``, ``""`` or ``"auto"`` mean the first GPU when there is one, else the CPU. A CUDA device on a machine
    without CUDA falls back to the CPU; a malformed name or a GPU index that does not exist is a 422.
    """
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    text = str(name or "auto").strip().lower()
    if text == "auto":
        return ("cuda:0" if torch.cuda.is_available() else "cpu"), ""
    if text == "gpu":
        text = "cuda"
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise UnprocessableInput(f"invalid device {name!r}: use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cpu":
        return "cpu", ""
    if device.type != "cuda":
        raise UnprocessableInput(f"unsupported device {name!r}: use 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        return "cpu", f"device {name!r} requested but CUDA is not available: running on the CPU"
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise UnprocessableInput(f"device {name!r} does not exist: this server has {torch.cuda.device_count()} GPU(s)")
    return f"cuda:{index}", ""


def parse_image_selection(images: Any) -> Tuple[str, Optional[List[str]]]:
    """``"all" | "labeled" | "unlabeled"`` -> (that name, None); a list or a comma list of ids -> ("list", ids)."""
    if images is None or (isinstance(images, str) and not images.strip()):
        return "all", None
    if isinstance(images, str):
        text = images.strip()
        if text.lower() in SELECTIONS:
            return text.lower(), None
        items: Sequence[Any] = text.split(",")
    elif isinstance(images, (list, tuple)):
        items = images
    else:
        raise UnprocessableInput("images must be 'all', 'labeled', 'unlabeled' or a list of image ids")
    ids: List[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UnprocessableInput(f"image ids must be strings, got {item!r}")
        item = item.strip()
        if item and item not in ids:
            ids.append(item)
    if not ids:
        raise UnprocessableInput("the list of images is empty")
    return "list", ids


def select_images(images: Any, datastore: Datastore) -> Tuple[str, List[str]]:
    """Resolve a selection against the datastore. ``labeled`` means having a ``final`` label.

    Unknown ids are a 404 naming every one of them, raised before anything starts.
    """
    selection, ids = parse_image_selection(images)
    if ids is None:
        if selection == "labeled":
            return selection, sorted(datastore.get_labeled_images())
        if selection == "unlabeled":
            return selection, sorted(datastore.get_unlabeled_images())
        return selection, sorted(datastore.list_images())
    known = set(datastore.list_images())
    unknown = [i for i in ids if i not in known]
    if unknown:
        shown = ", ".join(repr(i) for i in unknown[:20]) + (
            f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        )
        raise NotFound(f"unknown image id(s): {shown}; the datastore has {len(known)} images")
    return selection, ids


class LabelLoopBatchInfer(BatchInferTask):
    """Batch inference run in the server process with a read / infer / write pipeline (see the module docstring).

    ``infers`` and ``datastore`` return the app's infer tasks and datastore; ``gate`` lets interactive requests
    pause the batch. The server API uses :meth:`start`, :meth:`status` and :meth:`stop`; MONAI Label's own entry
    point (``app.batch_infer(request)``, used by ``run_sync`` and the command line) is :meth:`__call__`.
    """

    def __init__(
        self,
        infers: Callable[[], Dict[str, InferTask]],
        datastore: Callable[[], Datastore],
        gate: Optional[InteractiveGate] = None,
        history: int = 20,
    ):
        self.infers = infers
        self.datastore = datastore
        self.gate = gate or InteractiveGate()
        self._jobs: Deque[BatchJob] = deque(maxlen=history)
        self._lock = threading.Lock()

    # --------------------------------------------------------------------------------------------- API

    def get_images(self, request, datastore: Datastore) -> List[str]:
        return select_images(request.get("images"), datastore)[1]

    def start(
        self, model: str, images: Any = None, params: Optional[Dict[str, Any]] = None, datastore=None
    ) -> BatchJob:
        """Validate everything (model, images, device, tag), then start the batch in the background.

        Raises 404 for an unknown model or image ids, 409 when a batch is already running or the model has not
        been trained, 422 for a bad device or tag. ``params`` may hold ``images`` (overriding ``images``),
        ``device``, ``workers`` (images processed at once, each by a thread that reads, infers and writes it, the
        CPU threads shared among them; default: one per CPU thread on a CPU, one on a GPU), ``prefetch`` (with one
        worker: images read ahead; 0 runs the stages one after the other) and ``max_batch_size``; anything else is
        passed to the infer task as in ``/infer``.
        """
        params = dict(params or {})
        task = self.infers().get(model)
        if task is None:
            raise NotFound(f"unknown model {model!r}; available: {', '.join(sorted(self.infers())) or 'none'}")
        params = checked(f"run batch inference with {model!r}", params, INFER_RULES)
        tag = params.get("label_tag") or DefaultLabelTag.ORIGINAL.value
        if str(tag) != DefaultLabelTag.ORIGINAL.value:
            raise UnprocessableInput(
                f"batch inference stores its results as {DefaultLabelTag.ORIGINAL.value!r}; label_tag {tag!r} "
                "is not allowed (final labels are for corrected annotations)"
            )
        datastore = datastore or self.datastore()
        selection, ids = select_images(params.get("images", images), datastore)
        limit = _whole_number(params, "max_batch_size", 0)
        if limit > 0:
            ids = ids[:limit]
        device, note = resolve_device(params.get("device"))
        prefetch = _whole_number(params, "prefetch", 1)
        workers = max(1, _whole_number(params, "workers", INFERENCE_THREADS if device == "cpu" else 1))

        with self._lock:
            running = self._running()
            if running is not None:
                snap = running.snapshot()
                raise Conflict(
                    f"a batch inference is already running ({snap['done']}/{snap['total']} images done, "
                    f"model {snap['model']!r}); stop it first (DELETE /labelloop/batch) or wait for it"
                )
            if isinstance(task, BasicInferTask) and ids:
                task._get_network(device, None)  # ModelNotTrained (409) now rather than once per image
            job = BatchJob(model, selection, ids, device, {**params, "images": selection})
            self._jobs.append(job)
        if note:
            job.log(note, logging.WARNING)
        job.log(f"{len(ids)} image(s) ({selection}) with model {model!r} on {device}")
        thread = threading.Thread(
            target=self._run, args=(job, task, datastore, params, prefetch, workers), name="batch-infer", daemon=True
        )
        thread.start()
        return job

    def status(self, all: bool = False, check_if_running: bool = False):  # noqa: A002 - MONAI Label's name
        """The latest job (or every kept job with ``all``); ``None`` when there is none (or none is running)."""
        with self._lock:
            if check_if_running:
                job = self._running()
                return job.snapshot() if job else None
            if all:
                return [j.snapshot() for j in self._jobs]
            return self._jobs[-1].snapshot() if self._jobs else None

    def stop(self, wait: float = 30.0) -> Optional[Dict[str, Any]]:
        """Cancel the running batch and wait (up to ``wait`` s) until its threads have ended; ``None`` if none."""
        with self._lock:
            job = self._running()
        if job is None:
            return None
        if not job.cancel.is_set():
            job.log("cancel requested")
            job.cancel.set()
        job.done_event.wait(wait)
        return job.snapshot()

    def __call__(self, request, datastore: Datastore, infer: Optional[Callable] = None):
        """MONAI Label's synchronous entry point: run a batch to its end; ``{image id: result or {}}``."""
        request = dict(request)
        job = self.start(request.get("model", ""), request.get("images"), request, datastore=datastore)
        job.done_event.wait()
        snap = job.snapshot()
        return {r["image"]: ({"model_version": r.get("model_version", "")} if r["ok"] else {}) for r in snap["results"]}

    def _running(self) -> Optional[BatchJob]:
        return next((j for j in reversed(self._jobs) if j.running), None)

    def wait_idle(self, cancel: threading.Event) -> float:
        """Block while a batch runs (or until ``cancel``): background scoring yields to batches; seconds waited."""
        start = time.monotonic()
        while not cancel.is_set():
            with self._lock:
                job = self._running()
            if job is None:
                break
            job.done_event.wait(0.5)
        return time.monotonic() - start

    # --------------------------------------------------------------------------------------------- pipeline

    def _run(
        self, job: BatchJob, task: InferTask, datastore: Datastore, params: Dict[str, Any], prefetch: int, workers: int
    ):
        use_inference_threads()
        with job.lock:
            job.status = "RUNNING"
        request = {k: v for k, v in params.items() if k not in _BATCH_ONLY_KEYS}
        request.setdefault("logging", "WARNING")  # MONAI Label's per-transform logs, as its own batch does
        request.update({"model": job.model, "description": task.description, "device": job.device})
        try:
            if not isinstance(task, BasicInferTask):
                self._run_whole(job, task, datastore, request)
            elif workers > 1:
                self._run_parallel(job, task, datastore, request, workers)
            elif prefetch == 0:
                self._run_serial(job, task, datastore, request)
            else:
                self._run_pipelined(job, task, datastore, request, prefetch)
        except Exception as e:  # a bug, not a bad image: report it instead of leaving the job "RUNNING"
            logger.exception("batch %s stopped by an unexpected error", job.id[:8])
            job.finish("ERROR", f"{type(e).__name__}: {e}")
            return
        job.finish("STOPPED" if job.cancel.is_set() else "DONE")

    def _run_serial(self, job: BatchJob, task: BasicInferTask, datastore: Datastore, request: Dict[str, Any]):
        """Read, infer and write each image in turn (``prefetch=0``): the baseline the pipeline is measured on."""
        for image_id in job.image_ids:
            if job.cancel.is_set():
                return
            self._one(job, task, datastore, request, image_id)

    def _run_parallel(
        self, job: BatchJob, task: BasicInferTask, datastore: Datastore, request: Dict[str, Any], workers: int
    ):
        """``workers`` threads, each taking the next image and reading, inferring and writing it, with the CPU
        threads split among them. On a CPU this keeps every core busy with no idle stage and no per-layer
        synchronisation between PyTorch's threads; one worker reads while another computes."""
        pending: queue.Queue = queue.Queue()
        for image_id in job.image_ids:
            pending.put(image_id)
        threads_each = max(1, INFERENCE_THREADS // workers)
        job.log(f"{workers} workers, {threads_each} CPU thread(s) each")

        def work():
            torch.set_num_threads(threads_each)
            while not job.cancel.is_set():
                try:
                    image_id = pending.get_nowait()
                except queue.Empty:
                    return
                self._one(job, task, datastore, request, image_id)

        pool = [threading.Thread(target=work, name=f"batch-worker-{i}", daemon=True) for i in range(workers)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    def _one(self, job: BatchJob, task: BasicInferTask, datastore: Datastore, request: Dict[str, Any], image_id):
        """One image through the three stages; a failure is recorded for that image (not when cancelled)."""
        item = self._read(job, task, datastore, request, image_id)
        if isinstance(item, str):
            job.failed(image_id, item)
            return
        item = self._infer(job, task, item)
        if isinstance(item, str):
            if not job.cancel.is_set():
                job.failed(image_id, item)
            return
        self._write(job, task, datastore, item)

    def _run_pipelined(
        self, job: BatchJob, task: BasicInferTask, datastore: Datastore, request: Dict[str, Any], prefetch: int
    ):
        """Three threads joined by bounded queues: read ahead -> infer (this thread) -> write."""
        to_infer: queue.Queue = queue.Queue(maxsize=prefetch)
        to_write: queue.Queue = queue.Queue(maxsize=1)

        def reader():
            use_inference_threads()
            try:
                for image_id in job.image_ids:
                    if job.cancel.is_set():
                        break
                    _put(to_infer, (image_id, self._read(job, task, datastore, request, image_id)), job.cancel)
            finally:
                _put(to_infer, _END, job.cancel)

        def writer():
            use_inference_threads()
            while True:
                item = _get(to_write, job.cancel)
                if item is _END or item is None:
                    return
                self._write(job, task, datastore, item)

        threads = [
            threading.Thread(target=reader, name="batch-read", daemon=True),
            threading.Thread(target=writer, name="batch-write", daemon=True),
        ]
        for t in threads:
            t.start()
        try:
            while True:
                item = _get(to_infer, job.cancel)
                if item is _END or item is None:
                    break
                image_id, data = item
                if isinstance(data, str):
                    job.failed(image_id, data)
                    continue
                result = self._infer(job, task, data)
                if isinstance(result, str):
                    if job.cancel.is_set():
                        break
                    job.failed(image_id, result)
                    continue
                if not _put(to_write, result, job.cancel):
                    break
        finally:
            if job.cancel.is_set():
                _drain(to_infer)
            _put(to_write, _END, job.cancel)
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
                    if job.cancel.is_set():
                        _drain(to_infer)
                        _drain(to_write)

    def _run_whole(self, job: BatchJob, task: InferTask, datastore: Datastore, request: Dict[str, Any]):
        """An infer task that is not a ``BasicInferTask``: call it whole, one image after the other."""
        for image_id in job.image_ids:
            if job.cancel.is_set():
                return
            start = time.time()
            job.set_stage("inferring", image_id)
            try:
                path = _image_path(datastore, image_id)
                result_file, result_json = task({**request, "image": path, "image_id": image_id})
                stored = self._store(datastore, task, job.model, image_id, result_file, result_json)
                job.succeeded(image_id, time.time() - start, result_json, stored)
            except Exception as e:
                job.failed(image_id, _message(image_id, e))
            finally:
                job.set_stage("inferring", None)

    # --------------------------------------------------------------------------------------------- stages

    def _read(self, job: BatchJob, task: BasicInferTask, datastore: Datastore, request: Dict[str, Any], image_id):
        """Stage 1, as in ``BasicInferTask.__call__``: the request merged into the task's config, then the
        pre-transforms. Returns ``(image_id, data, pre_transforms, start, seconds)`` or an error message."""
        start = time.time()
        job.set_stage("reading", image_id)
        try:
            path = _image_path(datastore, image_id)
            req = copy.deepcopy(task.config())
            req.update(request)
            req.update({"image": path, "image_id": image_id})
            data = copy.deepcopy(req)
            data["image_path"] = path
            pre_transforms = task.pre_transforms(data)
            data = task.run_pre_transforms(data, pre_transforms)
        except Exception as e:
            return _message(image_id, e)
        finally:
            job.set_stage("reading", None)
            job.add_seconds("read", time.time() - start)
        return image_id, data, pre_transforms, start

    def _infer(self, job: BatchJob, task: BasicInferTask, item):
        """Stage 2: the network, with a hook that pauses for interactive requests and stops on cancel."""
        image_id, data, pre_transforms, start = item
        t0 = time.time()
        job.set_stage("inferring", image_id)
        try:
            with self._interruptible(job, task, data):
                if task.type == InferType.DETECTION:
                    data = task.run_detector(data, device=job.device)
                else:
                    data = task.run_inferer(data, device=job.device)
        except BatchCancelled:
            return "cancelled"
        except Exception as e:
            return _message(image_id, e)
        finally:
            job.set_stage("inferring", None)
            job.add_seconds("infer", time.time() - t0)
        return image_id, data, pre_transforms, start

    def _write(self, job: BatchJob, task: BasicInferTask, datastore: Datastore, item) -> None:
        """Stage 3: inverse and post transforms, the task's writer, then the datastore under ``original``."""
        image_id, data, pre_transforms, start = item
        t0 = time.time()
        job.set_stage("writing", image_id)
        try:
            data = task.run_invert_transforms(data, pre_transforms, task.inverse_transforms(data))
            data = task.run_post_transforms(data, task.post_transforms(data))
            result_file, result_json = task.writer(data)
            result_json = dict(result_json or {})
            result_json["label_names"] = task.labels
            pred = data.get("pred")
            values = sitk.GetArrayViewFromImage(pred) if isinstance(pred, sitk.Image) else None
            stored = self._store(datastore, task, job.model, image_id, result_file, result_json, values)
        except Exception as e:
            job.failed(image_id, _message(image_id, e))
        else:
            job.succeeded(image_id, time.time() - start, result_json, stored)
        finally:
            job.set_stage("writing", None)
            job.add_seconds("write", time.time() - t0)

    @staticmethod
    def _store(
        datastore: Datastore,
        task: InferTask,
        model: str,
        image_id: str,
        result_file,
        result_json: Dict[str, Any],
        values: Optional[np.ndarray] = None,
    ) -> bool:
        """Store the label map under ``original``; ``True`` when stored. A classification answer is JSON (any
        file beside it is an explanation map, not a label): nothing is stored, the record keeps the answer.
        ``values``: the voxels just written to ``result_file``, checked in memory rather than read back."""
        has_file = isinstance(result_file, str) and bool(result_file) and os.path.exists(result_file)
        try:
            if task.type == InferType.CLASSIFICATION:
                return False
            if not has_file:
                raise RuntimeError("the model produced no label file")
            info = {"model": model, "params": result_json}  # as MONAI Label's infer stores it
            in_memory = values is not None and isinstance(datastore, LabelLoopDatastore)  # not a DICOMweb store
            extra = {"values": values} if in_memory else {}
            datastore.save_label(image_id, result_file, DefaultLabelTag.ORIGINAL.value, info, **extra)
            return True
        finally:
            if has_file:
                os.remove(result_file)

    @contextlib.contextmanager
    def _interruptible(self, job: BatchJob, task: BasicInferTask, data: Dict[str, Any]) -> Iterator[None]:
        """A forward pre-hook on the (shared, cached) network that acts only in this batch's inference thread:
        it raises :class:`BatchCancelled` once the batch is cancelled, and waits while interactive requests run."""
        ident = threading.get_ident()

        def hook(module, args):
            if threading.get_ident() != ident:
                return None
            if job.cancel.is_set():
                raise BatchCancelled()
            if self.gate.active:
                job.add_seconds("paused", self.gate.wait_idle(job.cancel))
                if job.cancel.is_set():
                    raise BatchCancelled()
            return None

        handle = None
        network = task._get_network(job.device, data)
        if isinstance(network, torch.nn.Module) and not isinstance(network, torch.jit.ScriptModule):
            handle = network.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()


def _whole_number(params: Dict[str, Any], key: str, default: int) -> int:
    """A non-negative integer request parameter, or a 422 naming it."""
    value = params.get(key)
    try:
        number = default if value is None else int(value)
    except (TypeError, ValueError) as e:
        raise UnprocessableInput(f"{key} must be a whole number, got {value!r}") from e
    if number < 0:
        raise UnprocessableInput(f"{key} must be 0 or more, got {number}")
    return number


def _image_path(datastore: Datastore, image_id: str) -> str:
    path = datastore.get_image_uri(image_id)
    if not path:
        raise FileNotFoundError(f"image {image_id!r} is no longer in the datastore")
    return path


def _message(image_id: str, error: BaseException) -> str:
    """One line a person understands for a failed image."""
    if isinstance(error, UnreadableImageError):
        return f"cannot read image {image_id!r}: {error}"
    if isinstance(error, HTTPException):
        return str(error.detail)
    if isinstance(error, FileNotFoundError) and len(error.args) == 1:
        return str(error)
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else 'no message'}"


def _put(q: queue.Queue, item: Any, cancel: threading.Event) -> bool:
    """Put into a bounded queue, giving up (``False``) once the batch is cancelled."""
    while True:
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            if cancel.is_set():
                return False


def _get(q: queue.Queue, cancel: threading.Event) -> Any:
    """Get from a queue; ``None`` once the batch is cancelled."""
    while True:
        if cancel.is_set():
            return None
        try:
            return q.get(timeout=0.2)
        except queue.Empty:
            continue


def _drain(q: queue.Queue) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            q.get_nowait()


# ------------------------------------------------------------------------------------------------- routes


def build_batch_router(batch: LabelLoopBatchInfer) -> APIRouter:
    """``POST /batch/infer/{model}``, ``GET|DELETE /batch/infer`` (MONAI Label's, same answers, more fields) and
    ``GET|DELETE /labelloop/batch`` (the latest batch's progress; 404 when there is none)."""
    router = APIRouter()
    admin = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))
    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))

    @router.post("/batch/infer/{model}", summary="Run batch inference (results stored as 'original')")
    def run_batch(
        model: str,
        images: Optional[str] = None,
        params: Optional[dict] = None,
        run_sync: Optional[bool] = False,
        user: User = admin,
    ):
        if params is not None and not isinstance(params, dict):
            raise BadRequest("the request body must be a JSON object of batch parameters")
        job = batch.start(model, images, params)
        if run_sync:
            job.done_event.wait()
        return job.snapshot()

    @router.get("/batch/infer", summary="Status of the latest batch inference")
    def batch_status(all: bool = False, check_if_running: bool = False, user: User = user_role):  # noqa: A002
        result = batch.status(all, check_if_running)
        if result is None:
            raise HTTPException(
                status_code=404,
                detail="no batch inference is running" if check_if_running else "no batch inference has run yet",
            )
        return result

    @router.delete("/batch/infer", summary="Stop the running batch inference")
    def batch_stop(user: User = admin):
        return batch.stop()

    @router.get("/labelloop/batch", summary="Progress of the latest batch inference")
    def labelloop_batch_status(user: User = user_role):
        result = batch.status()
        if result is None:
            raise NotFound("no batch inference has run since the server started")
        return result

    @router.delete("/labelloop/batch", summary="Cancel the running batch inference")
    def labelloop_batch_stop(user: User = admin):
        result = batch.stop()
        if result is None:
            raise NotFound("no batch inference is running")
        return result

    return router
