"""Small MONAI transforms shared by the inference and training pipelines."""

from __future__ import annotations

from typing import Dict, Hashable, List, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    SelectItemsd,
    Spacingd,
    Transform,
)

from labelloop_app.geometry import Geometry, geometry_from_ras_affine, read_image, restore_labels


class LoadSITKd(MapTransform):
    """Load images with SimpleITK as channel-first MetaTensors with a RAS affine.

    Inference restores its output with SimpleITK from the same header, so reading with the same library keeps
    both ends of the pipeline on one definition of the grid (NIfTI qform/sform, NRRD space, DICOM series).
    The input grid is kept in ``<key>_geometry``.
    """

    def __init__(self, keys: KeysCollection, dtypes: Sequence = (np.float32,), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.dtypes = list(dtypes) * (len(self.keys) if len(dtypes) == 1 else 1)

    def __call__(self, data: Mapping[Hashable, object]) -> Dict[Hashable, object]:
        d = dict(data)
        for key, dtype in zip(self.key_iterator(d), self.dtypes):
            path = d[key]
            image = read_image(str(path))
            geometry = Geometry.of(image)
            array = np.transpose(sitk.GetArrayViewFromImage(image), (2, 1, 0)).astype(dtype)
            affine = torch.as_tensor(geometry.ras_affine(), dtype=torch.float64)
            meta = {
                "filename_or_obj": str(path),
                "original_affine": affine.clone(),
                "spatial_shape": np.array(geometry.size),
                "original_channel_dim": "no_channel",
            }
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=affine, meta=meta)
            d[f"{key}_geometry"] = geometry
        return d


def plain_tensor(t) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (a view, no copy); anything else through ``torch.as_tensor``. Plain
    tensors skip MetaTensor's per-operation bookkeeping where no metadata is needed."""
    return t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)


def intensity_transforms(keys: KeysCollection, modality: str, ct_window: Sequence[float]) -> List[Transform]:
    """CT: clip to a window and scale to [0, 1]. MR: z-score over the non-zero voxels (no absolute units in MR)."""
    if modality == "MR":
        return [NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)]
    return [ScaleIntensityRanged(keys=keys, a_min=ct_window[0], a_max=ct_window[1], b_min=0.0, b_max=1.0, clip=True)]


class LabelValuesToChannelsd(MapTransform):
    """Label values (as stored, e.g. TotalSegmentator's) -> network channels 1..N in the configured order.

    Unlike ``MapLabelValued``, a value that names no configured structure becomes background instead of
    passing through as an out-of-range class.
    """

    def __init__(self, keys: KeysCollection, labels: Mapping[str, int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.lut = np.zeros(256, dtype=np.float32)
        for channel, name in enumerate(labels, start=1):
            self.lut[labels[name]] = channel

    def __call__(self, data: Mapping[Hashable, object]) -> Dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            values = torch.as_tensor(label).round().long().clamp(0, 255)
            mapped = torch.from_numpy(self.lut)[values]
            d[key] = label.clone().copy_(mapped) if isinstance(label, MetaTensor) else mapped
        return d


def channel_values(labels: Mapping[str, int]) -> np.ndarray:
    """Label value written for each network channel (channel 0 is background, value 0)."""
    return np.array([0] + [labels[n] for n in labels], dtype=np.int64)


class RestoreLabelsd(Transform):
    """Turn the network's class scores into a label map on exactly the input image's grid.

    Reads the scores' grid from the pre-processed image's affine and the target grid from ``image_geometry``
    (the input header), resamples with :func:`labelloop_app.geometry.restore_labels`, and stores a SimpleITK
    image under ``pred``. Channel ``c`` becomes label value ``values[c]``.
    """

    def __init__(self, values: np.ndarray, mode: str = "linear", image_key: str = "image", pred_key: str = "pred"):
        self.values = values
        self.mode = mode
        self.image_key = image_key
        self.pred_key = pred_key

    def __call__(self, data: Mapping[Hashable, object]) -> Dict[Hashable, object]:
        d = dict(data)
        scores = d[self.pred_key]
        image = d[self.image_key]
        source = geometry_from_ras_affine(np.asarray(image.affine), scores.shape[1:])
        target = d[f"{self.image_key}_geometry"]
        scores_np = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
        d[self.pred_key] = restore_labels(scores_np, source, target, self.values, self.mode)
        return d


class Above:
    """``x > threshold``: the body mask of a CT (threshold in HU) as a picklable ``select_fn``."""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def __call__(self, x):
        return x > self.threshold


def whole_volume_transforms(
    key: str,
    modality: str,
    ct_window: Sequence[float],
    spacing: Sequence[float],
    spatial_size: Sequence[int],
    body_threshold: float,
) -> List[Transform]:
    """A whole volume as one fixed-size network input (image-level tasks such as classification).

    RAS orientation, resampling to ``spacing``, a crop to the body (voxels above ``body_threshold`` before
    windowing, plus a small margin), CT windowing or MR z-score, then a centred crop or zero pad (air after
    windowing) to ``spatial_size``. Every step updates the affine, so a map on the result goes back onto the input
    grid with :func:`labelloop_app.geometry.geometry_from_ras_affine`.
    """
    return [
        LoadSITKd(keys=key),
        Orientationd(keys=key, axcodes="RAS"),
        Spacingd(keys=key, pixdim=spacing, mode="bilinear"),
        CropForegroundd(keys=key, source_key=key, select_fn=Above(body_threshold), margin=2, allow_smaller=True),
        *intensity_transforms(key, modality, ct_window),
        ResizeWithPadOrCropd(keys=key, spatial_size=spatial_size, mode="constant"),
        EnsureTyped(keys=key, dtype=torch.float32),
    ]


def volume_transforms(conf) -> List[Transform]:
    """:func:`whole_volume_transforms` of the image with a :class:`~labelloop_app.conf.ClassificationConf`'s
    settings: what every classification network sees, in training and at inference."""
    c = conf
    return whole_volume_transforms("image", c.modality, c.ct_window, c.target_spacing, c.spatial_size, c.body_threshold)


def batch_items(keys: Sequence[str]) -> List[Transform]:
    """The end of every training and validation pipeline: only ``keys``, as plain tensors. A MetaTensor carries its
    metadata through every operation of the network, which doubled the time of a detector training step on a CPU;
    nothing after this point reads the metadata."""
    return [SelectItemsd(keys=keys), EnsureTyped(keys=keys, track_meta=False)]
