"""The ``segmentation`` train task: fine-tunes the served model from the datastore's ``final`` labels."""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from monai.engines.workflow import Events
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
    SelectItemsd,
    Spacingd,
    SpatialPadd,
)
from monailabel.tasks.train.basic_train import BasicTrainTask, Context
from monailabel.tasks.train.utils import region_wise_metrics

from labelloop_app.conf import SegmentationConf
from labelloop_app.training import EpochLoss, PublishWithHistory, TimeBudget, metrics_of
from labelloop_app.transforms import LabelValuesToChannelsd, LoadSITKd, intensity_transforms

logger = logging.getLogger(__name__)

KEYS = ("image", "label")


class SegmentationTrain(BasicTrainTask):
    """DiceCE training on patches balanced between background and the organs (each organ equally often).

    Augmentation: small affine, intensity scale/shift, noise, and flips along the anterior-posterior and
    superior-inferior axes only: a left-right flip would swap ``kidney_left`` and ``kidney_right``.
    Request parameters beyond MONAI Label's: ``learning_rate``, ``num_samples``, ``max_minutes`` (a time budget).
    """

    def __init__(self, conf: SegmentationConf, model_dir: str, network: torch.nn.Module, publish_path: str):
        self.conf = conf
        self._network = network
        super().__init__(
            model_dir=model_dir,
            description=f"Train the {conf.network} segmentation model from final labels",
            amp=torch.cuda.is_available(),
            load_path=publish_path,
            publish_path=publish_path,
            labels=dict(conf.labels),
            load_strict=False,
            config={
                "max_epochs": conf.max_epochs,
                "val_split": 0.2,
                "train_batch_size": 1,
                "val_batch_size": 1,
                "learning_rate": 1e-3,
                "num_samples": conf.num_samples,
                "max_minutes": 0,
                "dataset": "CacheDataset",
                "dataloader": "ThreadDataLoader",
                "tracking": "None",
            },
        )

    def load_path(self, output_dir, pretrained=True):
        """Fine-tune from the model being served, when there is one."""
        return self._load_path if pretrained else None

    def network(self, context: Context):
        return self._network

    def optimizer(self, context: Context):
        lr = float(context.request.get("learning_rate", 1e-3))
        return torch.optim.AdamW(context.network.parameters(), lr=lr, weight_decay=1e-5)

    def loss_function(self, context: Context):
        return DiceCELoss(to_onehot_y=True, softmax=True)

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
                ratios=[n] + [1] * n,  # half background, half organs, organs equally
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
            SelectItemsd(keys=KEYS),
        ]

    def train_post_transforms(self, context: Context):
        return [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=len(self.conf.labels) + 1),
        ]

    def val_pre_transforms(self, context: Context):
        return [*self._deterministic(), SelectItemsd(keys=KEYS)]

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(
            roi_size=self.conf.roi_size, sw_batch_size=self.conf.sw_batch_size, overlap=0.25, mode="gaussian"
        )

    def train_key_metric(self, context: Context):
        return region_wise_metrics(self.conf.channel_of, "train_mean_dice", "train")

    def val_key_metric(self, context: Context):
        return region_wise_metrics(self.conf.channel_of, "val_mean_dice", "val")

    def finalize(self, context: Context):
        """Attach the publisher with per-epoch history (replacing MONAI Label's) and the optional time budget."""
        if context.local_rank == 0:
            loss = EpochLoss()
            loss.attach(context.trainer)

            def record() -> Dict[str, Any]:
                train = metrics_of(context.trainer, "train_")
                val = metrics_of(context.evaluator, "val_")
                entry: Dict[str, Any] = {"loss": loss.mean(), "train_mean_dice": train.get("mean_dice")}
                if val:
                    entry["val_mean_dice"] = val.get("mean_dice")
                    entry["val_dice"] = {n: val.get(f"{n}_mean_dice") for n in self.conf.labels}
                entry["train_dice"] = {n: train.get(f"{n}_mean_dice") for n in self.conf.labels}
                return entry

            publisher = PublishWithHistory(
                self._stats_path,
                self._publish_path,
                self._key_metric_filename,
                context.start_ts,
                context.run_id,
                context.output_dir,
                context.trainer,
                context.evaluator,
                record=record,
                extra={
                    "labels": dict(self.conf.labels),
                    "network": self.conf.network,
                    "train_images": len(context.train_datalist),
                    "val_images": len(context.val_datalist),
                },
            )
            engine = context.evaluator or context.trainer
            engine.add_event_handler(Events.EPOCH_COMPLETED, publisher)

        minutes = float(context.request.get("max_minutes", 0) or 0)
        if minutes > 0:
            TimeBudget(minutes).attach(context.trainer)
