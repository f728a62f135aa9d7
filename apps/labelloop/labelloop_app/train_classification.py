"""The ``classification`` train task: fine-tunes the served classifier from the datastore's class labels.

Class labels are labels with the tag ``class`` (see :mod:`labelloop_app.class_labels`); segmentation's ``final``
labels are never read here, and this task's labels never reach segmentation training.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from monai.data import DataLoader, ThreadDataLoader
from monai.inferers import SimpleInferer
from monai.transforms import (
    Activationsd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import Context
from torch.utils.data import WeightedRandomSampler

from labelloop_app.class_labels import CLASS_TAG, class_labels_of
from labelloop_app.classification_metrics import PER_CLASS, SCALARS, ClassificationMetrics
from labelloop_app.conf import ClassificationConf, parse_bool
from labelloop_app.training import EpochLoss, LabelLoopTrainTask, metrics_of
from labelloop_app.transforms import batch_items, volume_transforms

logger = logging.getLogger(__name__)

KEYS = ("image", "label")


def class_weights(labels: List[int], n_classes: int) -> np.ndarray:
    """Per-sample weights ``1 / count(class)``: every class is drawn equally often, whatever its frequency."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return np.array([1.0 / counts[y] for y in labels], dtype=np.float64)


def stratified_split(datalist: List[Dict[str, Any]], val_split: float) -> Tuple[List[Dict], List[Dict]]:
    """Train/validation split class by class: each class with two or more images gives ``round(n * val_split)``
    of them, at least one and never all, to validation (the last ones in id order), so that even a handful of
    labels validates every class and the ROC AUC is defined."""
    if val_split <= 0.0:
        return list(datalist), []
    by_class: Dict[int, List[Dict[str, Any]]] = {}
    for d in datalist:
        by_class.setdefault(int(d["label"]), []).append(d)
    train: List[Dict[str, Any]] = []
    val: List[Dict[str, Any]] = []
    for _, items in sorted(by_class.items()):
        n_val = min(len(items) - 1, max(1, int(round(len(items) * val_split)))) if len(items) >= 2 else 0
        train += items[: len(items) - n_val]
        val += items[len(items) - n_val :]
    return train, val


class ClassificationTrain(LabelLoopTrainTask):
    """Cross-entropy training of the whole-volume classifier.

    Class balance: a ``WeightedRandomSampler`` draws every class equally often (request ``balance: false`` turns it
    off). Validation: a stratified split (``val_split``), so that both classes are validated even on small sets.
    Augmentation: small rotations, scaling and shifts, intensity scale/shift and noise; no flips, because
    laterality matters (a left-right flip moves the liver, and its lesions, to the wrong side).
    Request parameters beyond :class:`LabelLoopTrainTask`'s: ``balance``.
    """

    default_lr = 1e-3
    weight_decay = 1e-4
    learns_from = "class labels"

    def __init__(self, conf: ClassificationConf, model_dir: str, network: torch.nn.Module, publish_path: str):
        self.conf = conf
        super().__init__(
            network,
            publish_path,
            model_dir=model_dir,
            description=f"Train the {conf.network} classifier from {self.learns_from} (tag '{CLASS_TAG}')",
            labels=conf.index_of,
            config={"max_epochs": conf.max_epochs, "train_batch_size": conf.batch_size, "balance": True},
        )

    def loss_function(self, context: Context):
        return torch.nn.CrossEntropyLoss()

    def pre_process(self, request, datastore: Datastore):
        """The datalist: every image with a class label of a configured class, ``label`` = the class index."""
        index = self.conf.index_of
        datalist = []
        for image_id, name in class_labels_of(datastore).items():
            if name not in index:
                logger.warning("Skipping %s: class %r is not one of %s", image_id, name, ", ".join(index))
                continue
            datalist.append({"image": datastore.get_image_uri(image_id), "label": index[name], "image_id": image_id})
        if not datalist:
            raise ValueError(f"no class labels to train on: submit labels with tag '{CLASS_TAG}' first")
        return datalist

    def partition_datalist(self, context: Context, shuffle=False):
        """MONAI Label's split made stratified (unless the request gives ``val_ds``/``train_ds``): see
        :func:`stratified_split`."""
        if context.request.get("val_ds") or context.request.get("train_ds"):
            return super().partition_datalist(context, shuffle)
        train, val = stratified_split(context.datalist, float(context.request.get("val_split", 0.0)))
        logger.info("Total Records for Training: %d; Validation: %d", len(train), len(val))
        return train, val

    def train_data_loader(self, context: Context, num_workers=0, shuffle=True):
        dataset, datalist = self._dataset(context, context.train_datalist, is_train=True)
        context.train_dataset, context.train_dataset_list = dataset, datalist  # for work on the cached images
        if not parse_bool(context.request.get("balance"), default=True):
            return self._dataloader(context, dataset, context.train_batch_size, num_workers, shuffle)
        weights = class_weights([d["label"] for d in datalist], len(self.conf.classes))
        draws = len(weights) * self.draws_per_image(context)
        sampler = WeightedRandomSampler(torch.as_tensor(weights), num_samples=draws, replacement=True)
        loader = ThreadDataLoader if context.dataloader_type == "ThreadDataLoader" else DataLoader
        return loader(dataset, batch_size=context.train_batch_size, sampler=sampler, num_workers=num_workers)

    def draws_per_image(self, context: Context) -> int:
        """Samples per labeled image and epoch with class balance."""
        return 1

    def _deterministic(self):
        return volume_transforms(self.conf)

    def train_pre_transforms(self, context: Context):
        return [
            *self._deterministic(),
            RandAffined(
                keys="image",
                prob=0.5,
                rotate_range=(0.1, 0.1, 0.1),
                scale_range=(0.1, 0.1, 0.1),
                translate_range=(6, 6, 4),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.3, std=0.01),
            *batch_items(KEYS),
        ]

    def train_post_transforms(self, context: Context):
        return [Activationsd(keys="pred", softmax=True)]

    def val_pre_transforms(self, context: Context):
        return [*self._deterministic(), *batch_items(KEYS)]

    def val_inferer(self, context: Context):
        return SimpleInferer()

    def train_key_metric(self, context: Context):
        context.train_metric = ClassificationMetrics(self.conf.classes, "train_")
        return {"train_score": context.train_metric}

    def val_key_metric(self, context: Context):
        context.val_metric = ClassificationMetrics(self.conf.classes, "val_")
        return {"val_score": context.val_metric}

    def _report(self, prefix: str, metric: Optional[ClassificationMetrics], engine) -> Dict[str, Any]:
        """One set's metrics for the history: scalars through ``metrics_of``, the rest from the metric's report."""
        if metric is None or not metric.report:
            return {}
        scalars = metrics_of(engine, prefix)
        out: Dict[str, Any] = {}
        for key in SCALARS:
            out[f"{prefix}{key}"] = scalars.get(key)  # None when undefined (a class absent from the set)
        for key in PER_CLASS:
            out[f"{prefix}{key}"] = metric.report[key]
        out[f"{prefix}confusion_matrix"] = metric.report["confusion_matrix"]
        return out

    def record(self, context: Context, loss: EpochLoss) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"loss": loss.mean()}
        entry.update(self._report("train_", getattr(context, "train_metric", None), context.trainer))
        if context.evaluator is not None:
            entry.update(self._report("val_", getattr(context, "val_metric", None), context.evaluator))
        return entry

    def stats_extra(self, context: Context) -> Dict[str, Any]:
        counts = np.bincount([d["label"] for d in context.datalist], minlength=len(self.conf.classes))
        return {
            "classes": list(self.conf.classes),
            "class_counts": {n: int(c) for n, c in zip(self.conf.classes, counts)},
            "network": self.conf.network,
            **super().stats_extra(context),
        }
