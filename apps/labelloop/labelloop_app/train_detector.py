"""The ``classification`` train task for the ``detector`` network: learns class maps from findings on patches
(see :mod:`labelloop_app.detector`), validates image-level on whole volumes with the same metrics as the other
classifiers."""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from ignite.engine import Events
from monai.inferers import SimpleInferer
from monai.transforms import (
    Compose,
    FgBgToIndicesd,
    RandCropByPosNegLabeld,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
)
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.train.basic_train import Context

from labelloop_app.class_labels import class_findings_of
from labelloop_app.detector import (
    DEFAULT_PATCH,
    EvidenceCalibration,
    FindingLoss,
    FindingsToMaskd,
    HardNegativeIndicesd,
    HardNegatives,
    ImageProbabilitiesd,
    PatchClassd,
    PatchWindowInferer,
    detector_input_transforms,
    findings_datalist_item,
    unwrapped,
)
from labelloop_app.train_classification import KEYS, ClassificationTrain
from labelloop_app.training import PreprocessedImages
from labelloop_app.transforms import batch_items, intensity_transforms

logger = logging.getLogger(__name__)

HARD_NEGATIVE_DEFAULTS = {"hard_negatives": 0.5, "hard_negative_every": 100, "hard_negative_images": 8}
"""Share of a mapped normal image's patches centred on its hard negatives; iterations between refreshes; images
mapped per refresh."""


class DetectorTrain(ClassificationTrain):
    """Patch training of the class-map network from findings; whole-volume, image-level validation.

    Hard negatives: every ``hard_negative_every`` iterations the network maps the next ``hard_negative_images``
    training images without findings (in turn), and a ``hard_negatives`` share of their patches is then centred where
    it is most wrong (:class:`~labelloop_app.detector.HardNegatives`).

    Request parameters beyond :class:`ClassificationTrain`'s: ``patch`` (voxels per side, default 32),
    ``finding_weight`` (cross-entropy weight of finding voxels, default 20), ``hard_negatives`` (default 0.5; 0
    turns them off), ``hard_negative_every`` (default 100) and ``hard_negative_images`` (default 8).
    """

    default_lr = 2e-3
    learns_from = "the findings in class labels"
    voxels_per_image = 12 * 48**3
    """Patch voxels drawn per image and epoch: many small patches, so whole-volume validation takes a small share
    of the time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._config.update({"patch": DEFAULT_PATCH, "finding_weight": 20.0, **HARD_NEGATIVE_DEFAULTS})
        self._skipped = 0

    def loss_function(self, context: Context):
        weight = float(context.request.get("finding_weight", 20.0))
        return FindingLoss(len(self.conf.classes), weight)

    def pre_process(self, request, datastore: Datastore):
        """Images of the first class, and images of other classes whose label has findings."""
        findings = class_findings_of(datastore)
        datalist, self._skipped = [], 0
        for item in super().pre_process(request, datastore):
            marks = findings.get(item["image_id"])
            if item["label"] > 0 and not marks:
                self._skipped += 1
                continue
            datalist.append(findings_datalist_item(item, marks))
        if self._skipped:
            logger.warning("Skipping %d image(s) of a finding class without findings", self._skipped)
        if not any(d["label"] > 0 for d in datalist):
            raise ValueError("the detector needs findings: no image of a finding class has any in its class label")
        return datalist

    def draws_per_image(self, context: Context) -> int:
        return max(1, round(self.voxels_per_image / self._patch(context) ** 3))

    def _deterministic(self):
        return [*super()._deterministic(), *detector_input_transforms(self.conf)]

    def _tissue_threshold(self) -> Dict[str, Any]:
        """Where patches without findings are centred (the background indices): CT voxels above -50 HU (organs,
        where findings and their look-alikes are, rather than air and fat); anywhere for MR."""
        if self.conf.modality != "CT":
            return {}
        hu = {"image": torch.full((1, 1, 1, 1), -50.0)}
        for t in [*intensity_transforms("image", "CT", self.conf.ct_window), *detector_input_transforms(self.conf)]:
            hu = t(hu)  # -50 HU through the same intensity steps the images take
        return {"image_key": "image", "image_threshold": float(torch.as_tensor(hu["image"]).reshape(-1)[0])}

    def train_pre_transforms(self, context: Context):
        patch = self._patch(context)
        return [
            *self._deterministic(),
            FindingsToMaskd(),
            # where patches may be centred, computed once per image and cached with it
            FgBgToIndicesd(keys="label", **self._tissue_threshold()),
            HardNegativeIndicesd(self._hard_negatives(context), self._request(context, "hard_negatives")),
            # a wider crop around a finding voxel, then the patch anywhere in it: the finding lands anywhere
            # within a third of the patch of its centre, never always at the centre
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=[patch + 2 * (patch // 3)] * 3,
                pos=3,
                neg=2,
                num_samples=1,
                allow_smaller=True,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
            RandSpatialCropd(keys=KEYS, roi_size=[patch] * 3, random_size=False),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            *batch_items(KEYS),
        ]

    @staticmethod
    def _request(context: Context, key: str) -> float:
        """A hard-negative setting of the request, or its default."""
        return float(context.request.get(key, HARD_NEGATIVE_DEFAULTS[key]))

    @staticmethod
    def _hard_negatives(context: Context) -> HardNegatives:
        """The run's hard negatives, shared by its training transforms and the handler that refreshes them."""
        if getattr(context, "hard_negatives", None) is None:
            context.hard_negatives = HardNegatives()
        return context.hard_negatives

    def finalize(self, context: Context):
        super().finalize(context)
        if self._request(context, "hard_negatives") <= 0:
            return
        every = max(1, int(self._request(context, "hard_negative_every")))
        per_refresh = max(1, int(self._request(context, "hard_negative_images")))
        datalist = getattr(context, "train_dataset_list", context.train_datalist)
        normals = [d for d in datalist if int(d["label"]) == 0]
        images = PreprocessedImages(getattr(context, "train_dataset", None), datalist, Compose(self._deterministic()))
        inferer = PatchWindowInferer(self._patch(context))
        hard = self._hard_negatives(context)

        def refresh(engine) -> None:
            start = (engine.state.iteration // every - 1) * per_refresh
            batch = [normals[(start + k) % len(normals)] for k in range(min(per_refresh, len(normals)))]
            hard.refresh(context.network, {d["image_id"]: images[d["image_id"]] for d in batch}, inferer)

        if normals:
            context.trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), refresh)

    @staticmethod
    def _patch(context: Context) -> int:
        return int(context.request.get("patch", DEFAULT_PATCH))

    def train_post_transforms(self, context: Context):
        """Training metrics per patch: its class is the largest class painted in it."""

        def bias():
            return unwrapped(context.network).evidence_bias

        return [ImageProbabilitiesd(keys="pred", bias=bias), PatchClassd(keys="label")]

    def val_post_transforms(self, context: Context):
        return [ImageProbabilitiesd(keys="pred")]

    def val_handlers(self, context: Context):
        """The evidence calibration first, so that the checkpoint saved after it carries the fitted offsets."""
        handlers = super().val_handlers(context)
        if handlers is None:
            return None

        def rescore(engine, probs):
            context.val_metric.rescore(engine, "val_score", probs)

        return [EvidenceCalibration(context.network, rescore, self._patch(context)), *handlers]

    def train_inferer(self, context: Context):
        return SimpleInferer()

    def val_inferer(self, context: Context):
        """Whole volumes in training-patch windows, as inference sees them."""
        return PatchWindowInferer(self._patch(context))

    def stats_extra(self, context: Context) -> Dict[str, Any]:
        return {**super().stats_extra(context), "skipped_without_findings": self._skipped}
