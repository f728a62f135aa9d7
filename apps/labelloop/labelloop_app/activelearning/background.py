"""Scoring in a background thread of the server, which yields to inference.

MONAI Label would run each scoring request in a subprocess with its own copy of the datastore; two processes
writing ``datastore_v2.json`` from their own in-memory copies lose each other's updates. Scoring therefore runs
in one thread of the server process, with its own network copy, ``torch.set_num_threads(scoring_threads)`` and a
pause before every network call while an annotator's inference request is running (the app's ``InteractiveGate``,
which batch inference yields to as well). The thread setting also becomes the default of threads created later, so
inference threads restore their own count (:mod:`labelloop_app.torch_threads`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any, Callable, Deque, Dict, List, Optional

import torch
from monailabel.interfaces.tasks.scoring import ScoringMethod

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.today().strftime("%Y-%m-%d %H:%M:%S")


class BackgroundScoring:
    """One worker thread running scoring methods one request at a time.

    A request for a method that is already waiting is merged with it. Automatic requests (after a strategy call or
    at start-up) are skipped while a training task runs: the model is still changing, and training itself asks for
    scoring when it ends. Task records look like MONAI Label's (``id``, ``status``, ``start_ts``, ``end_ts``,
    ``result``) so that ``GET /scoring/`` keeps its shape.
    """

    def __init__(
        self,
        methods: Callable[[], Dict[str, ScoringMethod]],
        datastore: Callable[[], Any],
        threads: int = 1,
        training_running: Callable[[], bool] = lambda: False,
    ):
        self.methods = methods
        self.datastore = datastore
        self.threads = int(threads)
        self.training_running = training_running
        self.tasks: Deque[Dict[str, Any]] = deque(maxlen=50)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self.running: Optional[Dict[str, Any]] = None

    def submit(self, method: str, params: Optional[Dict[str, Any]] = None, automatic: bool = False) -> Dict[str, Any]:
        """Queue ``method``; returns its task record (an already waiting one if there is one)."""
        with self._lock:
            for task in self.tasks:
                if task["method"] == method and task["status"] == "SUBMITTED" and (params or {}) == task["request"]:
                    return task
            task = {
                "id": str(uuid.uuid4()),
                "method": method,
                "status": "SUBMITTED",
                "trigger": "automatic" if automatic else "request",
                "request": dict(params or {}),
                "start_ts": _now(),
                "result": None,
            }
            self.tasks.append(task)
            self._queue.put(task)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="labelloop-scoring", daemon=True)
                self._thread.start()
            return task

    def run_sync(self, method: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Run ``method`` in the calling thread (``run_sync=true``), still one scoring run at a time."""
        task = {
            "id": str(uuid.uuid4()),
            "method": method,
            "status": "RUNNING",
            "trigger": "request",
            "request": dict(params or {}),
            "start_ts": _now(),
            "result": None,
        }
        with self._lock:
            self.tasks.append(task)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            self._execute(task)
        finally:
            torch.set_num_threads(previous)
        return task

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            task = self._queue.get()
            if task["trigger"] == "automatic" and self.training_running():
                self._forget(task)  # training asks for scoring when it ends
                continue
            self._execute(task)
            if task["trigger"] == "automatic" and task["status"] == "DONE" and not (task["result"] or {}).get("scored"):
                self._forget(task)  # a check that found nothing to score is not worth a line in the history

    def _forget(self, task: Dict[str, Any]) -> None:
        with self._lock:
            if task in self.tasks:
                self.tasks.remove(task)

    def _execute(self, task: Dict[str, Any]) -> None:
        method = self.methods().get(task["method"])
        self.running = task
        task["status"] = "RUNNING"
        task["start_time"] = time.time()
        try:
            if method is None:
                raise KeyError(f"unknown scoring method {task['method']!r}")
            task["result"] = method(dict(task["request"]), self.datastore())
            task["status"] = "STOPPED" if (task["result"] or {}).get("stopped") else "DONE"
        except Exception as e:
            logger.exception("Scoring %s failed", task["method"])
            task["status"] = "ERROR"
            task["result"] = {"error": str(e)}
        finally:
            task["end_ts"] = _now()
            task["end_time"] = time.time()
            task["seconds"] = round(task["end_time"] - task["start_time"], 3)
            self.running = None

    def status(self, all: bool = False) -> Any:
        tasks: List[Dict[str, Any]] = list(self.tasks)
        if all:
            return tasks
        return tasks[-1] if tasks else None

    def idle(self) -> bool:
        return self.running is None and self._queue.empty()

    def stop(self) -> Optional[Dict[str, Any]]:
        """Drop waiting requests and ask the running one to stop after its current image."""
        with self._lock:
            while not self._queue.empty():
                task = self._queue.get_nowait()
                task.update(status="STOPPED", end_ts=_now())
        for method in self.methods().values():
            stop = getattr(method, "stop", None)
            if isinstance(stop, threading.Event):
                stop.set()
        return self.running
