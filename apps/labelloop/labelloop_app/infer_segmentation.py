"""The ``segmentation`` infer task: multi-organ 3D segmentation returned on the input's exact grid."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, Sequence, Tuple

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import Activationsd, EnsureTyped, Orientationd, Spacingd
from monailabel.interfaces.tasks.infer_v2 import InferType

from labelloop_app.conf import SegmentationConf
from labelloop_app.errors import UnprocessableInput
from labelloop_app.geometry import UnreadableImageError, image_extension, write_image
from labelloop_app.model_file import VersionedInferTask
from labelloop_app.transforms import LoadSITKd, RestoreLabelsd, channel_values, intensity_transforms

logger = logging.getLogger(__name__)


class SegmentationInfer(VersionedInferTask):
    """Orientation to RAS, resampling to the target spacing, CT windowing or MR z-score, sliding-window inference,
    then per-class probabilities resampled back onto the input grid (see :class:`RestoreLabelsd`)."""

    task_name = "segmentation"
    untrained_hint = "submit final labels and start training (POST /train/segmentation)"

    def __init__(self, conf: SegmentationConf, model_path: str, network: torch.nn.Module):
        super().__init__(
            conf,
            model_path,
            network,
            type=InferType.SEGMENTATION,
            labels=dict(conf.labels),
            description=f"Multi-organ segmentation ({conf.network}, {conf.modality}): {', '.join(conf.labels)}",
            roi_size=conf.roi_size,
            config={
                "sw_batch_size": conf.sw_batch_size,
                "sw_overlap": conf.sw_overlap,
                "restore": conf.restore,
                "network": conf.network,
                "modality": conf.modality,
                "target_spacing": list(conf.target_spacing),
            },
        )

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [
            LoadSITKd(keys="image"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=self.conf.target_spacing, mode="bilinear"),
            *intensity_transforms("image", self.conf.modality, self.conf.ct_window),
            EnsureTyped(keys="image", dtype=torch.float32),
        ]

    def inferer(self, data=None) -> Inferer:
        data = data or {}
        return SlidingWindowInferer(
            roi_size=data.get("roi_size", self.roi_size),
            sw_batch_size=int(data.get("sw_batch_size", self.conf.sw_batch_size)),
            overlap=float(data.get("sw_overlap", self.conf.sw_overlap)),
            mode="gaussian",
            padding_mode="constant",
        )

    def inverse_transforms(self, data=None):
        return None  # RestoreLabelsd puts the result on the input grid

    def post_transforms(self, data=None) -> Sequence[Callable]:
        mode = (data or {}).get("restore", self.conf.restore)
        return [
            Activationsd(keys="pred", softmax=True),
            RestoreLabelsd(values=channel_values(self.conf.labels), mode=mode),
        ]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        with torch.inference_mode():
            return super().run_inferer(data, convert_to_batch, device)

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Any, Any]:
        ext = data.get("result_extension") or image_extension(str(data.get("image_path", "")))
        if ext not in (".nii.gz", ".nii", ".nrrd", ".mha"):
            ext = ".nii.gz"
        path = tempfile.NamedTemporaryFile(suffix=ext, delete=False).name
        write_image(data["pred"], path)
        result = {
            "label_names": dict(self.conf.labels),
            "model_version": self.model_file.version(),
            "network": self.conf.network,
        }
        return path, result

    def __call__(self, request, callbacks=None):
        try:
            return super().__call__(request, callbacks)
        except UnreadableImageError as e:
            raise UnprocessableInput(f"cannot read image {os.path.basename(str(request.get('image')))!r}: {e}") from e
