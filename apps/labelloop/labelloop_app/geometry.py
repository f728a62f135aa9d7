"""Image geometry: reading headers, comparing grids, and putting predictions back on the input's grid.

Every label map LabelLoop produces must have exactly the input image's size, spacing, origin and direction.
The input is read with SimpleITK, and the prediction is resampled onto a grid copied from that same header, so
the output geometry equals the input's by construction, whatever the orientation, spacing or obliqueness.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import SimpleITK as sitk

# ITK stores physical points in LPS; MONAI's affines are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class UnreadableImageError(ValueError):
    """The file is not an image SimpleITK can read."""


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of a 3D image: size (x, y, z), spacing (mm), origin (LPS mm) and direction (row-major 3x3)."""

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())

    def reference_image(self, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
        ref = sitk.Image([int(s) for s in self.size], pixel_type)
        ref.SetSpacing(self.spacing)
        ref.SetOrigin(self.origin)
        ref.SetDirection(self.direction)
        return ref

    def ras_affine(self) -> np.ndarray:
        """The 4x4 voxel-to-RAS affine MONAI uses for this grid."""
        direction = np.array(self.direction, dtype=np.float64).reshape(3, 3)
        affine = np.eye(4)
        affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(self.spacing)
        affine[:3, 3] = LPS_TO_RAS @ np.array(self.origin, dtype=np.float64)
        return affine

    def mismatches(self, other: Geometry, rtol: float = 1e-4, atol_mm: float = 1e-3) -> list[str]:
        """Human-readable differences between two grids (empty when they match within tolerance)."""
        problems = []
        if tuple(self.size) != tuple(other.size):
            problems.append(f"size {tuple(other.size)} != {tuple(self.size)}")
        if not np.allclose(self.spacing, other.spacing, rtol=rtol, atol=1e-6):
            problems.append(f"spacing {_fmt(other.spacing)} != {_fmt(self.spacing)}")
        scale = max(1.0, float(np.max(np.abs(self.origin))))
        if not np.allclose(self.origin, other.origin, rtol=0, atol=max(atol_mm, rtol * scale)):
            problems.append(f"origin {_fmt(other.origin)} != {_fmt(self.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=rtol * 10):
            problems.append(f"direction {_fmt(other.direction)} != {_fmt(self.direction)}")
        return problems


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def geometry_from_ras_affine(affine: np.ndarray, size) -> Geometry:
    """The grid of a MONAI (RAS) affine and a spatial shape."""
    affine = np.asarray(affine, dtype=np.float64)
    lps = LPS_TO_RAS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    direction = lps / spacing
    origin = LPS_TO_RAS @ affine[:3, 3]
    return Geometry(
        tuple(int(s) for s in size), tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())
    )


def read_image(path: str) -> sitk.Image:
    """Read a file (NIfTI, NRRD, MHA, ...) or a DICOM series folder; raise UnreadableImageError with the reason."""
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(path)
            if not names:
                raise UnreadableImageError(f"no DICOM series in folder {os.path.basename(path)!r}")
            reader.SetFileNames(names)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
    except RuntimeError as e:
        raise UnreadableImageError(_itk_reason(e)) from e
    if image.GetDimension() != 3:
        raise UnreadableImageError(f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise UnreadableImageError(f"expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    return image


def read_geometry(path: str) -> Geometry:
    """The grid of an image file, reading only its header."""
    if os.path.isdir(path):
        return Geometry.of(read_image(path))
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise UnreadableImageError(_itk_reason(e)) from e
    if reader.GetDimension() != 3:
        raise UnreadableImageError(f"expected a 3D image, got {reader.GetDimension()}D")
    return Geometry(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def _itk_reason(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for ln in lines:
        if "Unable to determine ImageIO" in ln or "Could not create IO object" in ln:
            return "not a readable image format (NIfTI, NRRD, MHA or DICOM expected)"
    return lines[-1] if lines else "unreadable image"


def array_to_image(array_xyz: np.ndarray, geometry: Geometry) -> sitk.Image:
    """An image from an (x, y, z)-ordered array placed on ``geometry``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz, (2, 1, 0))))
    if tuple(image.GetSize()) != tuple(geometry.size):
        raise ValueError(f"array shape {array_xyz.shape} does not fit grid size {geometry.size}")
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def restore_labels(
    scores_xyz: np.ndarray,
    source: Geometry,
    target: Geometry,
    values: np.ndarray,
    mode: str = "linear",
) -> sitk.Image:
    """Resample per-class scores from the network grid onto the input grid and take the arg-max there.

    ``scores_xyz`` is (C, x, y, z) on ``source``; ``values[c]`` is the label value written for channel ``c``.
    ``mode="linear"`` interpolates each channel's probability (smooth boundaries at full resolution, one channel
    in memory at a time); ``"nearest"`` resamples the arg-max (fastest, blocky at coarse network spacing).
    Only the part of the input grid around the predicted structures is resampled; the rest is background.
    """
    argmax = np.argmax(scores_xyz, axis=0).astype(np.uint8)
    out = np.zeros(tuple(reversed(target.size)), dtype=np.uint8)  # (z, y, x)
    box = _foreground_box(argmax > 0, source, target)
    if box is not None:
        start, size = box
        sub = Geometry(
            size,
            target.spacing,
            target.reference_image().TransformIndexToPhysicalPoint([int(v) for v in start]),
            target.direction,
        )
        if mode == "nearest":
            small = array_to_image(values.astype(np.uint8)[argmax], source)
            patch = sitk.GetArrayFromImage(
                sitk.Resample(small, sub.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            )
        else:
            patch = _linear_argmax(scores_xyz, source, sub, values)
        x0, y0, z0 = start
        out[z0 : z0 + size[2], y0 : y0 + size[1], x0 : x0 + size[0]] = patch
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(target.reference_image())
    return image


def _linear_argmax(scores_xyz: np.ndarray, source: Geometry, target: Geometry, values: np.ndarray) -> np.ndarray:
    ref = target.reference_image(sitk.sitkFloat32)
    best = None
    best_channel = None
    for c in range(scores_xyz.shape[0]):
        channel = array_to_image(scores_xyz[c].astype(np.float32), source)
        default = 1.0 if c == 0 else 0.0  # outside the network's field of view: background
        resampled = sitk.Resample(channel, ref, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
        up = sitk.GetArrayViewFromImage(resampled)  # a view: valid while ``resampled`` lives
        if best is None:
            best = np.array(up)
            best_channel = np.zeros(best.shape, dtype=np.uint8)
        else:
            better = up > best
            best[better] = up[better]
            best_channel[better] = c
    return values.astype(np.uint8)[best_channel]


def _foreground_box(mask_xyz: np.ndarray, source: Geometry, target: Geometry, margin: int = 2):
    """Index box (start, size) of ``target`` covering the foreground of ``mask_xyz`` (on ``source``) plus a margin."""
    if not mask_xyz.any():
        return None
    idx = np.nonzero(mask_xyz)
    lo = np.maximum(np.array([i.min() for i in idx]) - margin, 0)
    hi = np.minimum(np.array([i.max() for i in idx]) + margin, np.array(mask_xyz.shape) - 1)
    src = source.reference_image()
    tgt = target.reference_image()
    corners = [
        tgt.TransformPhysicalPointToContinuousIndex(src.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]))
        for c in np.array(np.meshgrid(*zip(lo - 0.5, hi + 0.5), indexing="ij")).reshape(3, -1).T
    ]
    corners = np.array(corners)
    start = np.clip(np.floor(corners.min(axis=0)).astype(int) - 1, 0, np.array(target.size) - 1)
    stop = np.clip(np.ceil(corners.max(axis=0)).astype(int) + 2, 1, np.array(target.size))
    if np.any(stop <= start):
        return None
    return tuple(int(v) for v in start), tuple(int(v) for v in stop - start)


def write_image(image: sitk.Image, path: str, compress: bool = True) -> None:
    """Write atomically: a reader never sees a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{base}")
    try:
        sitk.WriteImage(image, tmp, useCompression=compress)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def image_extension(path: str, default: str = ".nii.gz") -> str:
    """The image file extension (``.nii.gz``, ``.seg.nrrd``, ``.nrrd``, ...) of a path."""
    name = os.path.basename(path).lower()
    for ext in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.endswith(ext):
            return ext
    return default


def label_array(path: str) -> Tuple[np.ndarray, Geometry]:
    """A label map's integer values (z, y, x) and grid; raises UnreadableImageError."""
    image = read_image(path)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        arr = sitk.GetArrayFromImage(image)
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise UnreadableImageError("label map holds non-integer values")
        arr = arr.astype(np.int64)
    else:
        arr = sitk.GetArrayFromImage(image)
    return arr, Geometry.of(image)
