"""Classification scores for active learning: the class-probability uncertainty the ``classification`` infer task
already reports (``"uncertainty": {"entropy", "margin", "least_confidence"}`` in its result) and how likely the image
shows a finding (``finding``: one minus the probability of the first class, the normal one), stored per image like
the segmentation scores so that the same strategies, leases and queue serve both tasks."""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod

from labelloop_app.activelearning.records import read_records, store_record
from labelloop_app.uncertainty import MEASURES

logger = logging.getLogger(__name__)

TASK = "classification"
FINDING = "finding"
"""Score of the ``cls_finding`` strategy: one minus the probability of the first class (``normal`` in the default
``normal,lesion``), the probability that the image shows any finding."""
SCORES = (*MEASURES, FINDING)


def class_uncertainty(result: Dict[str, Any]) -> Dict[str, float]:
    """``entropy``, ``margin`` and ``least_confidence`` of one classification result, and ``finding`` when it has
    class probabilities (``probabilities``/``probs``, a list or a ``{class: p}`` object in the classes' order). The
    uncertainty is the task's ``uncertainty`` when it reports it, else computed from the probabilities."""
    probs = result.get("probabilities", result.get("probs"))
    if isinstance(probs, dict):
        probs = list(probs.values())
    p = np.asarray(probs, dtype=np.float64) if probs is not None and len(probs) >= 2 else None
    reported = result.get("uncertainty")
    if isinstance(reported, dict) and all(k in reported for k in MEASURES):
        scores = {k: round(float(reported[k]), 6) for k in MEASURES}
    elif p is not None:
        scores = {name: round(float(fn(p)), 6) for name, fn in MEASURES.items()}
    else:
        raise ValueError("the classification result has neither 'uncertainty' nor class probabilities")
    if p is not None:
        scores[FINDING] = round(float(1.0 - p[0]), 6)
    return scores


class ClassificationScoring(ScoringMethod):
    """Runs the ``classification`` infer task on images without a class label (``unlabeled``) not yet scored by its
    current model and stores the uncertainty of the class probabilities (at most ``max_images`` per run)."""

    def __init__(
        self,
        infer_task: Callable[[], Optional[InferTask]],
        model_version: Callable[[], str],
        unlabeled: Callable[[Datastore], List[str]],
        max_images: int,
        wait: Optional[Callable[[], Any]] = None,
        stop: Optional[threading.Event] = None,
    ):
        super().__init__("Uncertainty of the class probabilities, for the cls_* strategies")
        self.infer_task = infer_task
        self.model_version = model_version
        self.unlabeled = unlabeled
        self.max_images = int(max_images)
        self.wait = wait
        self.stop = stop or threading.Event()
        self._lock = threading.Lock()

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info.update({"task": TASK, "scores": list(SCORES), "max_images": self.max_images})
        return info

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        with self._lock:
            start = time.time()
            task = self.infer_task()
            version = self.model_version()
            if task is None or not version:
                return {"method": TASK, "model_version": None, "scored": 0, "reason": "no trained model yet"}
            records = read_records(datastore, TASK)
            force = bool(request.get("force", False))
            unlabeled = sorted(self.unlabeled(datastore))
            todo = [i for i in unlabeled if force or records.get(i, {}).get("model_version") != version]
            todo.sort(key=lambda i: i in records)  # never scored first
            limit = int(request.get("max_images", self.max_images))
            per_image: Dict[str, float] = {}
            self.stop.clear()
            for image_id in todo[:limit]:
                if self.stop.is_set():
                    break
                if self.wait is not None:
                    self.wait()
                t0 = time.time()
                req = copy.deepcopy(task.config())
                req.update({"model": TASK, "image": datastore.get_image_uri(image_id), "save_label": False})
                try:
                    label_file, result = task(req)
                    scores = class_uncertainty(result or {})
                except Exception as e:  # one failing image must not stop the run
                    logger.warning("Classification scoring of %s failed: %s", image_id, e)
                    continue
                if isinstance(label_file, str) and os.path.isfile(label_file):
                    os.remove(label_file)
                seconds = round(time.time() - t0, 3)
                record = {
                    **scores,
                    "model_version": (result or {}).get("model_version") or version,
                    "seconds": seconds,
                    "ts": int(time.time()),
                }
                if store_record(datastore, image_id, TASK, record):
                    per_image[image_id] = seconds
            return {
                "method": TASK,
                "model_version": version,
                "scored": len(per_image),
                "skipped": len(unlabeled) - len(todo),
                "remaining": max(0, len(todo) - len(per_image)),
                "seconds": round(time.time() - start, 3),
                "seconds_per_image": round(float(np.mean(list(per_image.values()))), 3) if per_image else None,
                "per_image": per_image,
                "stopped": self.stop.is_set(),
            }
