"""Explanation maps of a classification: where in the volume the network looked, on the input image's own grid.

``gradcam`` (default): MONAI's :class:`~monai.visualize.GradCAM` on the network's last convolutional block, scaled
to [0, 1] (1: the region that most raised the explained class's score). One forward and one backward pass.
``occlusion``: MONAI's :class:`~monai.visualize.OcclusionSensitivity`; the value is how much the explained class's
probability drops when a neighbourhood is hidden (0.3: the probability falls by 0.3 there). One forward pass per
mask position: minutes on a CPU for a whole torso.

Either map is computed on the network's input grid and resampled (linear) onto the input image's grid, so it
overlays the image in Slicer exactly like a label map does.
"""

from __future__ import annotations

import copy
from typing import Dict, Hashable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Transform
from monai.visualize import GradCAM, OcclusionSensitivity

from labelloop_app.geometry import Geometry, array_to_image, geometry_from_ras_affine

METHODS = ("gradcam", "occlusion")


def explain_method(value) -> str | None:
    """The method a request's ``explain`` asks for: ``true``/``"gradcam"`` -> gradcam, ``"occlusion"``, or None."""
    if value is None or value is False:
        return None
    if value is True:
        return "gradcam"
    text = str(value).strip().lower()
    if text in ("", "0", "false", "no", "off", "none"):
        return None
    if text in ("1", "true", "yes", "on"):
        return "gradcam"
    if text not in METHODS:
        raise ValueError(f"explain={value!r}: use true, 'gradcam' or 'occlusion'")
    return text


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Scale each map to [0, 1] (max -> 1); a constant map becomes 0."""
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


def gradcam_map(network: torch.nn.Module, image: torch.Tensor, class_index: int, layer: str) -> np.ndarray:
    """Grad-CAM of ``class_index`` for ``image`` (C, x, y, z): (x, y, z) in [0, 1] on the image's grid.

    Works on a copy of the network: Grad-CAM registers hooks (and turns off in-place activations) on the module
    it wraps, which must not change the model that other requests are using.
    """
    net = copy.deepcopy(network).eval()
    cam = GradCAM(nn_module=net, target_layers=layer, postprocessing=_unit_range)
    with torch.enable_grad():
        out = cam(image[None].float(), class_idx=int(class_index))
    return out[0, 0].detach().cpu().numpy().astype(np.float32)


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=1)


def occlusion_map(
    network: torch.nn.Module, image: torch.Tensor, class_index: int, probability: float, mask_fraction: float = 0.125
) -> np.ndarray:
    """Drop of the class probability when each neighbourhood is hidden: (x, y, z) on the image's grid."""
    mask = [max(2, int(round(s * mask_fraction))) for s in image.shape[1:]]
    occ = OcclusionSensitivity(
        nn_module=network.eval(),
        mask_size=mask,
        n_batch=8,
        verbose=False,
        overlap=0.25,
        activate=_softmax,  # MONAI's default picks sigmoid for a one-channel *input*, whatever the class count
    )
    with torch.inference_mode():
        occluded, _ = occ(image[None].float())
    # MONAI 1.4 returns (batch, class, *spatial): the class probability with each neighbourhood hidden
    return (float(probability) - occluded[0, int(class_index)]).detach().cpu().numpy().astype(np.float32)


def restore_map(map_xyz: np.ndarray, source: Geometry, target: Geometry) -> sitk.Image:
    """Resample a float map (x, y, z) on ``source`` linearly onto ``target``; 0 outside the source's extent."""
    moving = array_to_image(np.asarray(map_xyz, dtype=np.float32), source)
    ref = target.reference_image(sitk.sitkFloat32)
    return sitk.Resample(moving, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


class RestoreMapd(Transform):
    """Put ``data[key]`` (a map on the pre-processed image's grid) on the input image's grid as a SimpleITK image.

    The source grid comes from the pre-processed image's affine (after orientation, resampling, crop and pad), the
    target from ``<image_key>_geometry`` (the input header), as :class:`~labelloop_app.transforms.RestoreLabelsd`
    does for label maps.
    """

    def __init__(self, keys: Sequence[str] = ("explanation",), image_key: str = "image"):
        self.keys = list(keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, object]) -> Dict[Hashable, object]:
        d = dict(data)
        image = d[self.image_key]
        target = d[f"{self.image_key}_geometry"]
        for key in self.keys:
            if d.get(key) is None:
                continue
            values = np.asarray(d[key], dtype=np.float32)
            source = geometry_from_ras_affine(np.asarray(image.affine), values.shape)
            d[key] = restore_map(values, source, target)
        return d
