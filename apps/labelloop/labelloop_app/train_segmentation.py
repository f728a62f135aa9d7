"""The ``segmentation`` train task: fine-tunes the served model from the datastore's ``final`` labels."""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    ClassesToIndicesd,
    EnsureTyped,
    Orientationd,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from monailabel.tasks.train.basic_train import Context
from monailabel.tasks.train.utils import region_wise_metrics

from labelloop_app.conf import SegmentationConf
from labelloop_app.training import EpochLoss, LabelLoopTrainTask, metrics_of
from labelloop_app.transforms import LabelValuesToChannelsd, LoadSITKd, batch_items, intensity_transforms

logger = logging.getLogger(__name__)

KEYS = ("image", "label")


class SegmentationTrain(LabelLoopTrainTask):
    """DiceCE training on patches centred on the background and on each structure equally often.

    The Dice term is computed over the whole batch of patches, not patch by patch: a patch without a kidney would
    otherwise score a Dice of 0 for any kidney voxel the network guesses, and teach it to predict none. With both,
    the small structures start to learn minutes earlier in the learning benchmark (``benchmarks/results/learning.md``).

    Augmentation: small affine, intensity scale/shift, noise, and flips along the anterior-posterior and
    superior-inferior axes only: a left-right flip would swap ``kidney_left`` and ``kidney_right``.
    Request parameters beyond :class:`LabelLoopTrainTask`'s: ``num_samples`` (patches per image per iteration).
    """

    def __init__(self, conf: SegmentationConf, model_dir: str, network: torch.nn.Module, publish_path: str):
        self.conf = conf
        super().__init__(
            network,
            publish_path,
            model_dir=model_dir,
            description=f"Train the {conf.network} segmentation model from final labels",
            labels=dict(conf.labels),
            config={"max_epochs": conf.max_epochs, "train_batch_size": 1, "num_samples": conf.num_samples},
        )

    def loss_function(self, context: Context):
        return DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    def _deterministic(self):
        return [
            LoadSITKd(keys=KEYS),
            Orientationd(keys=KEYS, axcodes="RAS"),
            Spacingd(keys=KEYS, pixdim=self.conf.target_spacing, mode=("bilinear", "nearest")),
            *intensity_transforms("image", self.conf.modality, self.conf.ct_window),
            LabelValuesToChannelsd(keys="label", labels=self.conf.labels),
            EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
        ]

    def train_pre_transforms(self, context: Context):
        n = len(self.conf.labels)
        num_samples = int(context.request.get("num_samples", self.conf.num_samples))
        return [
            *self._deterministic(),
            SpatialPadd(keys=KEYS, spatial_size=self.conf.roi_size),
            ClassesToIndicesd(keys="label", num_classes=n + 1, indices_postfix="_cls_indices"),  # cached once
            RandCropByLabelClassesd(
                keys=KEYS,
                label_key="label",
                spatial_size=self.conf.roi_size,
                num_classes=n + 1,
                ratios=[1] * (n + 1),  # background and each organ equally
                num_samples=num_samples,
                indices_key="label_cls_indices",
                warn=False,
            ),
            RandAffined(
                keys=KEYS,
                prob=0.3,
                rotate_range=(0.15, 0.15, 0.15),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandFlipd(keys=KEYS, spatial_axis=1, prob=0.1),
            RandFlipd(keys=KEYS, spatial_axis=2, prob=0.1),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            RandGaussianNoised(keys="image", prob=0.2, std=0.02),
            *batch_items(KEYS),
        ]

    def train_post_transforms(self, context: Context):
        return [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=len(self.conf.labels) + 1),
        ]

    def val_pre_transforms(self, context: Context):
        return [*self._deterministic(), *batch_items(KEYS)]

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(
            roi_size=self.conf.roi_size, sw_batch_size=self.conf.sw_batch_size, overlap=0.25, mode="gaussian"
        )

    def train_key_metric(self, context: Context):
        return region_wise_metrics(self.conf.channel_of, "train_mean_dice", "train")

    def val_key_metric(self, context: Context):
        return region_wise_metrics(self.conf.channel_of, "val_mean_dice", "val")

    def record(self, context: Context, loss: EpochLoss) -> Dict[str, Any]:
        train = metrics_of(context.trainer, "train_")
        val = metrics_of(context.evaluator, "val_")
        entry: Dict[str, Any] = {"loss": loss.mean(), "train_mean_dice": train.get("mean_dice")}
        if val:
            entry["val_mean_dice"] = val.get("mean_dice")
            entry["val_dice"] = {n: val.get(f"{n}_mean_dice") for n in self.conf.labels}
        entry["train_dice"] = {n: train.get(f"{n}_mean_dice") for n in self.conf.labels}
        return entry

    def stats_extra(self, context: Context) -> Dict[str, Any]:
        return {"labels": dict(self.conf.labels), "network": self.conf.network, **super().stats_extra(context)}
