"""The ``classification`` infer task: one class per image, with probabilities, uncertainty and an optional
explanation map on the input's exact grid.

Result JSON (``output=json``, or the ``params`` part of ``output=all``)::

    {"class": "lesion", "class_index": 1, "probabilities": {"normal": 0.08, "lesion": 0.92},
     "prediction": [{"idx": 0, "label": "normal", "score": 0.08}, ...],     # MONAI Label's classification form
     "uncertainty": {"entropy": 0.40, "margin": 0.16, "least_confidence": 0.16},
     "model_version": "3f2a9c1b0d4e", "network": "densenet121",
     "explanation": {"method": "gradcam", "class": "lesion"}}            # only when asked for

Request parameters: ``explain`` (``true``/``"gradcam"`` or ``"occlusion"``) adds the explanation map as the image
part of ``output=all`` / ``output=image`` (a float32 ``.nii.gz`` on the input image's grid); ``explain_class``
(a class name) explains that class instead of the predicted one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Activationsd
from monailabel.interfaces.tasks.infer_v2 import InferType

from labelloop_app.conf import ClassificationConf
from labelloop_app.detector import (
    EVIDENCE_BIAS,
    ImageProbabilitiesd,
    PatchWindowInferer,
    detector_input_transforms,
    image_probabilities,
)
from labelloop_app.errors import BadRequest, UnprocessableInput
from labelloop_app.explain import RestoreMapd, explain_method, gradcam_map, occlusion_map
from labelloop_app.geometry import UnreadableImageError, write_image
from labelloop_app.model_file import VersionedInferTask
from labelloop_app.networks import CAM_LAYERS
from labelloop_app.transforms import plain_tensor, volume_transforms
from labelloop_app.uncertainty import MEASURES

logger = logging.getLogger(__name__)


def class_probabilities(pred: Any) -> np.ndarray:
    """Softmax output as float64 probabilities that sum to exactly 1 (up to float64 rounding)."""
    p = np.asarray(torch.as_tensor(pred).detach().cpu().double().numpy(), dtype=np.float64).reshape(-1)
    p = np.clip(p, 0.0, None)
    return p / p.sum()


class ClassificationInfer(VersionedInferTask):
    """Whole-volume classification: RAS, fixed spacing, body crop, windowing, fixed size; softmax over classes."""

    task_name = "classification"
    untrained_hint = "submit class labels (tag 'class') and start training (POST /train/classification)"

    def __init__(self, conf: ClassificationConf, model_path: str, network: torch.nn.Module):
        super().__init__(
            conf,
            model_path,
            network,
            type=InferType.CLASSIFICATION,
            labels={name: i for i, name in enumerate(conf.classes)},
            description=f"Image classification ({conf.network}, {conf.modality}): {', '.join(conf.classes)}",
            config={
                "explain": False,
                "network": conf.network,
                "modality": conf.modality,
                "classes": list(conf.classes),
                "target_spacing": list(conf.target_spacing),
                "spatial_size": list(conf.spatial_size),
            },
        )

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return volume_transforms(self.conf)

    def inferer(self, data=None) -> Inferer:
        return SimpleInferer()

    def inverse_transforms(self, data=None):
        return None  # the class needs no inversion; RestoreMapd puts an explanation map on the input grid

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [Activationsd(keys="pred", softmax=True), RestoreMapd(keys=("explanation",))]

    def _explain_class(self, data: Dict[str, Any], logits: torch.Tensor) -> int:
        name = data.get("explain_class")
        if name in (None, ""):
            return int(torch.argmax(logits).item())
        return self.conf.index_of[name]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        with torch.inference_mode():
            data = super().run_inferer(data, convert_to_batch, device)
        method = explain_method(data.get("explain"))
        if method is None:
            return data
        network = self._get_network(device, data)
        logits = torch.as_tensor(data[self.output_label_key]).detach().float().reshape(-1)
        index = self._explain_class(data, logits)
        image = data[self.input_key]
        image = plain_tensor(image).to(device)
        if method == "gradcam":
            data["explanation"] = gradcam_map(network, image, index, CAM_LAYERS[self.conf.network])
        else:
            probability = float(torch.softmax(logits, dim=0)[index])
            data["explanation"] = occlusion_map(network, image, index, probability)
        data["explanation_meta"] = {"method": method, "class": self.conf.classes[index]}
        return data

    def writer(self, data: Dict[str, Any], extension=None, dtype=None) -> Tuple[Optional[str], Dict[str, Any]]:
        probs = class_probabilities(data[self.output_label_key])
        index = int(np.argmax(probs))
        classes = list(self.conf.classes)
        result: Dict[str, Any] = {
            "class": classes[index],
            "class_index": index,
            "probabilities": {name: float(p) for name, p in zip(classes, probs)},
            "prediction": [{"idx": i, "label": n, "score": float(p)} for i, (n, p) in enumerate(zip(classes, probs))],
            "uncertainty": {name: float(fn(probs)) for name, fn in MEASURES.items()},
            "model_version": self.model_file.version(),
            "network": self.conf.network,
        }
        path = None
        if data.get("explanation") is not None:
            path = tempfile.NamedTemporaryFile(suffix=".nii.gz", delete=False).name
            write_image(data["explanation"], path)
            result["explanation"] = dict(data["explanation_meta"])
        return path, result

    def __call__(self, request, callbacks=None):
        try:
            explain_method(request.get("explain"))
        except ValueError as e:
            raise BadRequest(str(e)) from e
        name = request.get("explain_class")
        if name not in (None, "") and name not in self.conf.classes:
            raise BadRequest(f"explain_class {name!r} is not a class; valid classes: {', '.join(self.conf.classes)}")
        try:
            return super().__call__(request, callbacks)
        except UnreadableImageError as e:
            raise UnprocessableInput(f"cannot read image {os.path.basename(str(request.get('image')))!r}: {e}") from e


class DetectorInfer(ClassificationInfer):
    """The ``detector`` classifier (see :mod:`labelloop_app.detector`): the network maps each class over the volume,
    in windows of its training patch; the image's probabilities come from its most probable voxels, calibrated by
    the network's ``evidence_bias`` (fitted on the validation images in training), and the explanation is that
    class map itself (whichever method ``explain`` names), on the input image's grid."""

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [*super().pre_transforms(data), *detector_input_transforms(self.conf)]

    def inferer(self, data=None) -> Inferer:
        return PatchWindowInferer()

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return [ImageProbabilitiesd(keys="pred"), RestoreMapd(keys=("explanation",))]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch=True, device="cuda"):
        with torch.inference_mode():
            data = VersionedInferTask.run_inferer(self, data, convert_to_batch, device)
            bias = self._get_network(device, data).evidence_bias.detach().cpu()
            data[EVIDENCE_BIAS] = bias
            if explain_method(data.get("explain")) is None:
                return data
            logits = torch.as_tensor(data[self.output_label_key]).detach().float()
            index = self._explain_class(data, image_probabilities(logits, bias))
            data["explanation"] = torch.softmax(logits, dim=0)[index].cpu().numpy().astype(np.float32)
        data["explanation_meta"] = {"method": "class_map", "class": self.conf.classes[index]}
        return data
