"""Epoch-level classification metrics, computed with MONAI's ``ConfusionMatrixMetric`` and ``ROCAUCMetric``.

One report holds everything a user needs to judge a classifier on a small, often unbalanced set: accuracy,
balanced accuracy (mean per-class sensitivity, so a majority-class guesser scores 1/C), per-class sensitivity,
specificity, precision and F1, the ROC AUC (macro one-vs-rest) and the confusion matrix (rows: true class,
columns: predicted class). Undefined values (a class absent from the set) are ``None``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.handlers.utils import from_engine
from monai.metrics import ConfusionMatrixMetric, ROCAUCMetric

PER_CLASS = {"sensitivity": "sensitivity", "specificity": "specificity", "precision": "precision", "f1": "f1 score"}
SCALARS = ("accuracy", "balanced_accuracy", "auc")


def _clean(v: float) -> Optional[float]:
    """None for NaN (undefined); 6 decimals (MONAI computes the confusion-matrix ratios in float32)."""
    return None if v is None or not math.isfinite(float(v)) else round(float(v), 6)


def classification_report(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> Dict[str, Any]:
    """Metrics of class probabilities ``probs`` (N, C) against true class indices ``labels`` (N,)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(classes))
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n_classes = len(classes)
    predicted = probs.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    report: Dict[str, Any] = {"n": int(len(labels)), "confusion_matrix": matrix.tolist()}
    if not len(labels):
        report.update({k: None for k in SCALARS})
        report.update({k: {c: None for c in classes} for k in PER_CLASS})
        return report

    eye = torch.eye(n_classes, dtype=torch.float64)
    y_pred, y = eye[torch.as_tensor(predicted)], eye[torch.as_tensor(labels)]
    cm = ConfusionMatrixMetric(metric_name=tuple(PER_CLASS.values()), reduction="sum_batch")
    cm(y_pred=y_pred, y=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 for a class never predicted or absent: reported as None
        per_class = [v.reshape(-1).tolist() for v in cm.aggregate()]
    for key, values in zip(PER_CLASS, per_class):
        report[key] = {c: _clean(v) for c, v in zip(classes, values)}

    present = [report["sensitivity"][c] for c in classes if matrix[classes.index(c)].sum() > 0]
    report["accuracy"] = float(np.trace(matrix) / matrix.sum())
    report["balanced_accuracy"] = float(np.mean(present)) if present else None
    report["auc"] = None
    if len(np.unique(labels)) > 1:
        auc = ROCAUCMetric(average="macro")
        auc(y_pred=torch.as_tensor(probs), y=y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a class absent from the set: AUC undefined for it
            report["auc"] = _clean(auc.aggregate())
    report["mean_true_probability"] = float(probs[np.arange(len(labels)), labels].mean())
    return report


def selection_score(report: Dict[str, Any]) -> float:
    """The key metric that picks the published model: the ROC AUC (the accuracy when a class is missing from the
    set), plus a thousandth of the mean probability given to the true class so that, on small sets where the AUC
    soon reaches 1, ties go to the more confident model."""
    main = report.get("auc")
    if main is None:
        main = report.get("accuracy") or 0.0
    return float(main) + 1e-3 * float(report.get("mean_true_probability") or 0.0)


class ClassificationMetrics(Metric):
    """An ignite metric for a trainer or an evaluator: gathers each epoch's softmax outputs and labels, then puts
    the :func:`selection_score` under its own name and ``<prefix>accuracy``, ``<prefix>balanced_accuracy``,
    ``<prefix>auc`` in ``engine.state.metrics`` (floats; absent when undefined); the full report stays in
    :attr:`report`.
    """

    def __init__(self, classes: Sequence[str], prefix: str, output_transform=from_engine(["pred", "label"])):
        self.classes = list(classes)
        self.prefix = prefix
        self.report: Dict[str, Any] = {}
        self._probs: List[np.ndarray] = []
        self._labels: List[int] = []
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._probs, self._labels = [], []

    def update(self, output) -> None:
        preds, labels = output
        for p, y in zip(preds, labels):
            self._probs.append(torch.as_tensor(p).detach().float().cpu().reshape(-1).numpy())
            self._labels.append(int(torch.as_tensor(y).reshape(-1)[0].item()))

    def compute(self) -> float:
        probs = np.stack(self._probs) if self._probs else np.zeros((0, len(self.classes)))
        self.report = classification_report(probs, np.array(self._labels, dtype=np.int64), self.classes)
        return selection_score(self.report)

    def rescore(self, engine: Engine, name: str, probs: np.ndarray) -> None:
        """Recompute this epoch's figures from other probabilities (N, C) of the same images, in the same order
        (recalibrated ones, for instance)."""
        self._probs = [np.asarray(p, dtype=np.float32).reshape(-1) for p in probs]
        self.completed(engine, name)

    def completed(self, engine: Engine, name: str) -> None:
        engine.state.metrics[name] = self.compute()
        for key in SCALARS:
            value = self.report.get(key)
            if value is None:  # undefined this epoch: no stale value, and no NaN in the stats JSON
                engine.state.metrics.pop(self.prefix + key, None)
            else:
                engine.state.metrics[self.prefix + key] = float(value)
