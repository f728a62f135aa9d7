"""Label maps <-> 3D Slicer segmentation files (``.seg.nrrd``), without Slicer.

Why: the server stores integer label maps whose values mean named structures; Slicer edits segmentations whose
segments carry a name, a color and a label value in a possibly different numbering. Converting by *name* (never by
segment order or Slicer's label values) is what keeps "liver" meaning liver on both sides.

The ``.seg.nrrd`` layout follows Slicer's ``vtkMRMLSegmentationStorageNode``:

* the voxel array is 3D ``(x, y, z)`` when all segments share one layer, or 4D ``(layer, x, y, z)``
  (``kinds: list domain domain domain``) when segments overlap; in a layer, a segment's voxels hold its
  ``Segment{N}_LabelValue``;
* ``Segment{N}_Extent`` bounds each segment in the coordinates of the stored array;
* Slicer may crop the stored array to the segments (*crop to minimum extent*); then
  ``Segmentation_ReferenceImageExtentOffset`` is the index, in the reference image, of the stored array's first
  voxel, and ``Segmentation_ConversionParameters`` holds the reference image geometry (``Reference image
  geometry``: a 4x4 IJK-to-RAS matrix and the extent) from which the full grid is rebuilt;
* the physical space is LPS (``space: left-posterior-superior``); ``space origin`` is the center of the stored
  array's first voxel.

Geometry here is always LPS, arrays are indexed ``(x, y, z)`` (NRRD/Fortran order) and a direction matrix has
one axis per *column*, as SimpleITK's ``GetDirection()`` reshaped to 3x3.

Non-ASCII segment names: the NRRD format defines the header as ASCII. Slicer writes segment names as the raw
bytes of its UTF-8 strings and reads them back the same way. pynrrd decodes header lines as ASCII and *drops*
every non-ASCII character (``"Leber/Äste"`` would become ``"Leber/ste"``) and refuses to write them. This module
therefore writes its key/value fields itself as UTF-8 and re-reads them from the raw header bytes (UTF-8, or
Latin-1 when the bytes are not valid UTF-8), so names round-trip exactly, including with Slicer.

pynrrd is imported on first use and SimpleITK only by the NIfTI functions, so importing this module is cheap and
works in a Slicer that does not have pynrrd yet.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from LabelLoopLib.colors import RGB, color_for, normalize_name

LPS = "left-posterior-superior"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
EMPTY_EXTENT = (0, -1, 0, -1, 0, -1)
Extent = Tuple[int, int, int, int, int, int]


class SegmentationFileError(ValueError):
    """A file that is not a usable segmentation (the message says why)."""


def _nrrd():
    try:
        import nrrd
    except ImportError as e:  # pragma: no cover - exercised only where pynrrd is missing
        raise ImportError(
            "reading and writing .seg.nrrd files needs the Python package 'pynrrd' (pip install pynrrd)"
        ) from e
    return nrrd


# --------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """Voxel grid in LPS: ``point = origin + direction @ diag(spacing) @ (i, j, k)``.

    ``direction`` holds one unit axis per column (SimpleITK's ``GetDirection()`` reshaped to 3x3).
    """

    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[Tuple[float, float, float], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))

    @classmethod
    def create(cls, spacing: Sequence[float], origin: Sequence[float], direction: Any = None) -> Geometry:
        """Build from any sequences; ``direction`` may be 3x3 (columns = axes), 9 row-major numbers or ``None``."""
        d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
        return cls(
            tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            tuple(float(v) for v in origin),  # type: ignore[arg-type]
            tuple(tuple(float(v) for v in row) for row in d),
        )

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=np.float64)

    @property
    def axes_matrix(self) -> np.ndarray:
        """``direction @ diag(spacing)``: column ``i`` is the LPS step of one voxel along array axis ``i``."""
        return self.direction_matrix @ np.diag(self.spacing)

    def ijk_to_lps(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.axes_matrix
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """The 4x4 matrix Slicer stores as image-to-world (RAS)."""
        m = np.eye(4)
        m[:3, :3] = _LPS_TO_RAS @ self.axes_matrix
        m[:3, 3] = _LPS_TO_RAS @ np.asarray(self.origin)
        return m

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> Geometry:
        m = np.asarray(matrix, dtype=np.float64).reshape(4, 4)
        axes = _LPS_TO_RAS @ m[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        return cls.create(spacing, _LPS_TO_RAS @ m[:3, 3], axes / spacing)

    def shifted(self, offset_ijk: Sequence[float]) -> Geometry:
        """The same grid with its first voxel moved to index ``offset_ijk`` of this grid."""
        origin = np.asarray(self.origin) + self.axes_matrix @ np.asarray(offset_ijk, dtype=np.float64)
        return replace(self, origin=tuple(float(v) for v in origin))

    def continuous_index(self, point_lps: Sequence[float]) -> np.ndarray:
        return np.linalg.solve(self.axes_matrix, np.asarray(point_lps, dtype=np.float64) - np.asarray(self.origin))

    def same_axes(self, other: Geometry, rtol: float = 1e-4) -> bool:
        """Same spacing and direction (the grids differ at most by a translation)."""
        return bool(
            np.allclose(self.spacing, other.spacing, rtol=rtol, atol=1e-6)
            and np.allclose(self.direction_matrix, other.direction_matrix, atol=rtol * 10)
        )

    def sitk_direction(self) -> Tuple[float, ...]:
        return tuple(float(v) for v in self.direction_matrix.ravel())


# --------------------------------------------------------------------------------------------------- data model


@dataclass
class SegmentInfo:
    """One segment of a segmentation file.

    ``extent`` is (i0, i1, j0, j1, k0, k1), inclusive, in the coordinates of :attr:`SegmentationData.layers`;
    ``None`` means the whole array. A segment's voxels are those of its layer equal to ``label_value`` inside
    its extent.
    """

    name: str
    label_value: int
    color: RGB = (0.5, 0.5, 0.5)
    layer: int = 0
    id: str = ""
    extent: Optional[Extent] = None
    tags: Dict[str, str] = field(default_factory=dict)
    name_auto_generated: bool = False
    color_auto_generated: bool = False

    def __post_init__(self) -> None:
        if not self.id:
            self.id = self.name


SegmentLike = Union[SegmentInfo, Tuple[str, int, Sequence[float]], Tuple[str, int, Sequence[float], int]]


@dataclass
class SegmentationData:
    """Contents of a ``.seg.nrrd``: ``layers`` is (L, x, y, z) on ``geometry``.

    When the file named its reference image geometry, ``layers`` already covers the whole reference grid
    (``reference_shape``) and ``reference_extent_offset`` is (0, 0, 0). Otherwise ``layers`` is the stored array
    and ``reference_extent_offset`` is where its first voxel lies in the (unknown-size) reference grid.
    """

    layers: np.ndarray
    segments: List[SegmentInfo]
    geometry: Geometry
    reference_extent_offset: Tuple[int, int, int] = (0, 0, 0)
    reference_shape: Optional[Tuple[int, int, int]] = None
    fields: Dict[str, str] = field(default_factory=dict)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(int(s) for s in self.layers.shape[1:])  # type: ignore[return-value]

    @property
    def names(self) -> List[str]:
        return [s.name for s in self.segments]

    def segment(self, name: str) -> SegmentInfo:
        for s in self.segments:
            if s.name == name:
                return s
        raise KeyError(f"no segment named {name!r}; segments: {', '.join(self.names) or 'none'}")

    def mask(self, segment: Union[SegmentInfo, str]) -> np.ndarray:
        """Boolean (x, y, z) mask of one segment, restricted to its extent."""
        seg = self.segment(segment) if isinstance(segment, str) else segment
        layer = self.layers[seg.layer]
        if seg.extent is None:
            return layer == seg.label_value
        out = np.zeros(layer.shape, dtype=bool)
        box = _extent_slices(seg.extent, layer.shape)
        if box is not None:
            out[box] = layer[box] == seg.label_value
        return out


@dataclass
class LabelMapBuild:
    """Result of :func:`build_labelmap`.

    ``overlap_voxels`` counts voxels claimed by two segments with different values (the later layer won);
    ``matched`` maps each segment name used to the server's name (they differ only in case/blanks).
    """

    labelmap: np.ndarray
    unknown_names: List[str]
    overlap_voxels: int = 0
    voxels_per_name: Dict[str, int] = field(default_factory=dict)
    empty_names: List[str] = field(default_factory=list)
    matched: Dict[str, str] = field(default_factory=dict)


def _extent_slices(extent: Sequence[int], shape: Sequence[int]) -> Optional[Tuple[slice, slice, slice]]:
    lo = [max(0, int(extent[2 * a])) for a in range(3)]
    hi = [min(int(shape[a]) - 1, int(extent[2 * a + 1])) for a in range(3)]
    if any(h < low for low, h in zip(lo, hi)):
        return None
    return tuple(slice(low, h + 1) for low, h in zip(lo, hi))  # type: ignore[return-value]


def bounding_extent(mask: np.ndarray) -> Extent:
    """Inclusive bounding box (i0, i1, j0, j1, k0, k1) of a boolean mask; Slicer's empty extent if none."""
    if not mask.any():
        return EMPTY_EXTENT
    out: List[int] = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        out += [int(hit[0]), int(hit[-1])]
    return tuple(out)  # type: ignore[return-value]


def _smallest_uint(max_value: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if max_value <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"label value {max_value} is too large")


# --------------------------------------------------------------------------------------------------- writing


def _as_segment(item: SegmentLike, index: int) -> SegmentInfo:
    if isinstance(item, SegmentInfo):
        return replace(item, tags=dict(item.tags))
    if len(item) not in (3, 4):
        raise ValueError(f"segment {item!r}: expected (name, value, color) or (name, value, color, layer)")
    name, value, color = item[0], int(item[1]), tuple(float(c) for c in item[2])
    layer = int(item[3]) if len(item) == 4 else 0
    return SegmentInfo(name=str(name), label_value=value, color=color, layer=layer, id=f"Segment_{index + 1}")


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, (tuple, list, np.ndarray)):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def _check_field_text(key: str, value: str) -> None:
    if "\n" in value or "\r" in value:
        raise ValueError(f"{key}: a segmentation header value cannot contain a line break ({value!r})")


def _tags_text(tags: Mapping[str, str]) -> str:
    return "".join(f"{k}:{v}|" for k, v in sorted(tags.items()))


def _reference_geometry_text(geometry: Geometry, shape: Sequence[int]) -> str:
    matrix = ";".join(f"{v:.17g}" for v in geometry.ijk_to_ras().ravel())
    extent = ";".join(str(v) for v in (0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1))
    return (
        f"Reference image geometry|{matrix};{extent};|Image geometry description string determining the geometry "
        "of the labelmap that is created in course of conversion. Can be copied from a volume, using the button.&"
    )


def write_seg_nrrd(
    path: Union[str, os.PathLike],
    labelmap: np.ndarray,
    geometry: Geometry,
    segments: Iterable[SegmentLike],
    compress: bool = True,
) -> str:
    """Write a Slicer segmentation file.

    ``labelmap`` is either one (x, y, z) integer label map (every segment in layer 0) or (L, x, y, z) layers with
    each segment naming its layer. ``segments``: :class:`SegmentInfo` or ``(name, value, color[, layer])`` tuples,
    colors r, g, b in 0-1. Voxel values no segment names raise ``ValueError`` (they would silently vanish in
    Slicer). Returns the path. The file is written atomically.
    """
    arr = np.asarray(labelmap)
    if arr.ndim == 3:
        layers = arr[np.newaxis]
    elif arr.ndim == 4:
        layers = arr
    else:
        raise ValueError(f"labelmap must be 3D (x, y, z) or 4D (layer, x, y, z), got shape {arr.shape}")
    if not np.issubdtype(layers.dtype, np.integer) and not np.issubdtype(layers.dtype, np.bool_):
        if not np.all(np.mod(layers, 1) == 0):
            raise ValueError("labelmap holds non-integer values")
    if layers.size and int(layers.min()) < 0:
        raise ValueError("labelmap holds negative values")

    segs = [_as_segment(s, i) for i, s in enumerate(segments)]
    used = set()
    for s in segs:
        if s.label_value <= 0:
            raise ValueError(f"segment {s.name!r}: label value must be positive, got {s.label_value}")
        if not 0 <= s.layer < layers.shape[0]:
            raise ValueError(f"segment {s.name!r}: layer {s.layer} does not exist ({layers.shape[0]} layers)")
        key = (s.layer, s.label_value)
        if key in used:
            raise ValueError(f"two segments use label value {s.label_value} in layer {s.layer}")
        used.add(key)
    for layer_index in range(layers.shape[0]):
        present = set(int(v) for v in np.unique(layers[layer_index])) - {0}
        unnamed = sorted(present - {v for (lay, v) in used if lay == layer_index})
        if unnamed:
            raise ValueError(f"label values {unnamed} in layer {layer_index} belong to no segment")
    ids = [s.id for s in segs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"segment ids must be unique, got {ids}")

    dtype = _smallest_uint(int(layers.max()) if layers.size else 0)
    layers = layers.astype(dtype, copy=False)
    four_d = layers.shape[0] > 1
    data = layers if four_d else layers[0]

    axes = geometry.axes_matrix.T  # NRRD: one row per axis
    header: Dict[str, Any] = {
        "space": LPS,
        "space directions": np.vstack([np.full(3, np.nan), axes]) if four_d else axes,
        "kinds": ["list", "domain", "domain", "domain"] if four_d else ["domain", "domain", "domain"],
        "encoding": "gzip" if compress else "raw",
        "space origin": np.asarray(geometry.origin, dtype=np.float64),
    }
    shape = layers.shape[1:]
    fields: List[Tuple[str, str]] = [
        ("Segmentation_MasterRepresentation", "Binary labelmap"),
        ("Segmentation_ContainedRepresentationNames", "Binary labelmap|"),
        ("Segmentation_ReferenceImageExtentOffset", "0 0 0"),
        ("Segmentation_ConversionParameters", _reference_geometry_text(geometry, shape)),
    ]
    for index, s in enumerate(segs):
        extent = s.extent if s.extent is not None else bounding_extent(layers[s.layer] == s.label_value)
        prefix = f"Segment{index}_"
        fields += [
            (prefix + "Color", _fmt(tuple(float(c) for c in s.color))),
            (prefix + "ColorAutoGenerated", _fmt(bool(s.color_auto_generated))),
            (prefix + "Extent", _fmt(tuple(int(v) for v in extent))),
            (prefix + "ID", s.id),
            (prefix + "LabelValue", str(int(s.label_value))),
            (prefix + "Layer", str(int(s.layer))),
            (prefix + "Name", s.name),
            (prefix + "NameAutoGenerated", _fmt(bool(s.name_auto_generated))),
            (prefix + "Tags", _tags_text(s.tags)),
        ]
    for key, value in fields:
        _check_field_text(key, value)

    buffer = io.BytesIO()
    _nrrd().write(buffer, data, header, index_order="F")
    raw = buffer.getvalue()
    end = raw.find(b"\n\n")
    if end < 0:  # pragma: no cover - pynrrd always ends the header with a blank line
        raise RuntimeError("unexpected NRRD header layout")
    extra = "".join(f"{k}:={v}\n" for k, v in fields).encode("utf-8")
    content = raw[: end + 1] + extra + raw[end + 1 :]

    path = os.fspath(path)
    tmp = f"{path}.part-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def pack_masks(masks: Sequence[np.ndarray]) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """Pack boolean masks into as few layers as possible (one layer unless some overlap).

    Returns ``(layers (L, x, y, z) uint8, [(layer, value) per mask])``; values count from 1 within each layer.
    """
    if not masks:
        raise ValueError("no masks")
    shape = masks[0].shape
    layers: List[np.ndarray] = []
    next_value: List[int] = []
    placement: List[Tuple[int, int]] = []
    for mask in masks:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != shape:
            raise ValueError(f"mask shapes differ: {mask.shape} != {shape}")
        for index, layer in enumerate(layers):
            if next_value[index] < 255 and not np.any(layer[mask]):
                break
        else:
            layers.append(np.zeros(shape, dtype=np.uint8))
            next_value.append(1)
            index = len(layers) - 1
        value = next_value[index]
        layers[index][mask] = value
        next_value[index] += 1
        placement.append((index, value))
    return np.stack(layers), placement


def write_seg_nrrd_from_masks(
    path: Union[str, os.PathLike],
    masks: Mapping[str, np.ndarray],
    geometry: Geometry,
    colors: Optional[Union[Mapping[str, Sequence[float]], Callable[[str], RGB]]] = None,
    label_values: Optional[Mapping[str, int]] = None,
) -> str:
    """Write named, possibly overlapping boolean masks; a 3D file when none overlap, 4D layers otherwise.

    ``label_values`` (e.g. the server's) is used for the label values when all masks fit in one layer.
    """
    names = list(masks)
    layers, placement = pack_masks([masks[n] for n in names])
    if layers.shape[0] == 1 and label_values and all(n in label_values for n in names):
        remapped = np.zeros(layers.shape, dtype=_smallest_uint(max(int(label_values[n]) for n in names)))
        for n, (_, v) in zip(names, placement):
            remapped[layers == v] = int(label_values[n])
        layers = remapped
        placement = [(0, int(label_values[n])) for n in names]
    segs = [
        SegmentInfo(name=n, label_value=v, layer=lay, color=_color_of(n, colors), id=f"Segment_{i + 1}")
        for i, (n, (lay, v)) in enumerate(zip(names, placement))
    ]
    return write_seg_nrrd(path, layers, geometry, segs)


def _color_of(name: str, colors: Any) -> RGB:
    if colors is None:
        return color_for(name)
    if callable(colors):
        return tuple(float(c) for c in colors(name))  # type: ignore[return-value]
    if name in colors:
        return tuple(float(c) for c in colors[name])  # type: ignore[return-value]
    return color_for(name)


# --------------------------------------------------------------------------------------------------- reading


def _raw_fields(path: str) -> Dict[str, str]:
    """Key/value (``key:=value``) header fields decoded from the raw bytes (UTF-8, else Latin-1)."""
    out: Dict[str, str] = {}
    with open(path, "rb") as f:
        first = f.readline()
        if not first.startswith(b"NRRD"):
            raise SegmentationFileError(f"{os.path.basename(path)} is not a NRRD file")
        for raw in f:
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                break
            if line.startswith(b"#") or b":=" not in line:
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = line.decode("latin-1")
            key, value = text.split(":=", 1)
            out[key.strip()] = value.strip()
    return out


def _parse_extent(text: Optional[str]) -> Optional[Extent]:
    if not text:
        return None
    values = [int(round(float(v))) for v in text.split()]
    if len(values) != 6:
        raise SegmentationFileError(f"bad segment extent {text!r}")
    return tuple(values)  # type: ignore[return-value]


def _parse_color(text: Optional[str]) -> RGB:
    if not text:
        return (0.5, 0.5, 0.5)
    values = [float(v) for v in text.split()]
    if len(values) < 3:
        raise SegmentationFileError(f"bad segment color {text!r}")
    return (values[0], values[1], values[2])


def _parse_tags(text: Optional[str]) -> Dict[str, str]:
    tags: Dict[str, str] = {}
    for item in (text or "").split("|"):
        if ":" in item:
            k, v = item.split(":", 1)
            tags[k] = v
    return tags


def _conversion_parameters(text: Optional[str]) -> Dict[str, str]:
    params: Dict[str, str] = {}
    for item in (text or "").split("&"):
        parts = item.split("|")
        if len(parts) >= 2 and parts[0]:
            params[parts[0]] = parts[1]
    return params


def _reference_geometry(text: Optional[str]) -> Optional[Tuple[Geometry, Extent]]:
    if not text:
        return None
    numbers = [v for v in text.split(";") if v.strip()]
    if len(numbers) < 22:
        return None
    try:
        matrix = np.array([float(v) for v in numbers[:16]]).reshape(4, 4)
        extent = tuple(int(round(float(v))) for v in numbers[16:22])
        return Geometry.from_ijk_to_ras(matrix), extent  # type: ignore[return-value]
    except (ValueError, np.linalg.LinAlgError):
        return None


def _file_geometry(header: Mapping[str, Any], spatial_axes: Sequence[int]) -> Geometry:
    space = str(header.get("space", LPS)).lower()
    directions = header.get("space directions")
    if directions is None:
        axes = np.eye(3)
    else:
        rows = np.asarray(directions, dtype=np.float64)
        axes = np.array([rows[a] for a in spatial_axes], dtype=np.float64).T  # columns = axes
        if np.isnan(axes).any():
            raise SegmentationFileError("space directions are missing for a spatial axis")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if space in ("right-anterior-superior", "ras"):
        axes = _LPS_TO_RAS @ axes
        origin = _LPS_TO_RAS @ origin
    elif space not in ("left-posterior-superior", "lps"):
        raise SegmentationFileError(f"unsupported NRRD space {space!r} (expected left-posterior-superior)")
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing == 0):
        raise SegmentationFileError("zero voxel spacing")
    return Geometry.create(spacing, origin, axes / spacing)


def read_seg_nrrd(path: Union[str, os.PathLike]) -> SegmentationData:
    """Read a Slicer segmentation file (3D or 4D, cropped or not) and place it on its reference grid if known."""
    path = os.fspath(path)
    nrrd = _nrrd()
    try:
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            data = nrrd.read_data(header, fh, path, index_order="F")
    except (OSError, nrrd.NRRDError) as e:
        raise SegmentationFileError(f"cannot read {os.path.basename(path)}: {e}") from e
    fields = _raw_fields(path)

    if data.ndim == 3:
        layers = data[np.newaxis]
        spatial = (0, 1, 2)
    elif data.ndim == 4:
        kinds = [str(k).lower() for k in header.get("kinds", ["list", "domain", "domain", "domain"])]
        list_axis = next((i for i, k in enumerate(kinds) if k not in ("domain", "space")), 0)
        layers = np.moveaxis(data, list_axis, 0)
        spatial = tuple(i for i in range(4) if i != list_axis)
    else:
        raise SegmentationFileError(f"expected a 3D or 4D array, got {data.ndim}D")
    if np.issubdtype(layers.dtype, np.floating):
        layers = np.rint(layers)
    layers = layers.astype(_smallest_uint(int(layers.max()) if layers.size else 0))
    geometry = _file_geometry(header, spatial)

    segments: List[SegmentInfo] = []
    index = 0
    while f"Segment{index}_ID" in fields:
        p = f"Segment{index}_"
        layer_text = fields.get(p + "Layer")
        label_text = fields.get(p + "LabelValue")
        segments.append(
            SegmentInfo(
                name=fields.get(p + "Name") or fields[p + "ID"],
                label_value=int(label_text) if label_text else 1,
                color=_parse_color(fields.get(p + "Color") or fields.get(p + "DefaultColor")),
                layer=int(layer_text) if layer_text else (index if layers.shape[0] > 1 else 0),
                id=fields[p + "ID"],
                extent=_parse_extent(fields.get(p + "Extent")),
                tags=_parse_tags(fields.get(p + "Tags")),
                name_auto_generated=fields.get(p + "NameAutoGenerated") == "1",
                color_auto_generated=fields.get(p + "ColorAutoGenerated") == "1",
            )
        )
        index += 1
    for s in segments:
        if not 0 <= s.layer < layers.shape[0]:
            raise SegmentationFileError(f"segment {s.name!r} refers to layer {s.layer}; the file has {len(layers)}")

    # An all-zero 1x1x1 array is Slicer's way of storing "no voxels at all".
    if layers.shape[1:] == (1, 1, 1) and not layers.any():
        for s in segments:
            s.extent = EMPTY_EXTENT

    offset_text = fields.get("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    try:
        offset = tuple(int(round(float(v))) for v in offset_text.split())
    except ValueError as e:
        raise SegmentationFileError(f"bad reference image extent offset {offset_text!r}") from e
    if len(offset) != 3:
        offset = (0, 0, 0)

    result = SegmentationData(layers, segments, geometry, offset, None, fields)  # type: ignore[arg-type]
    params = _conversion_parameters(fields.get("Segmentation_ConversionParameters"))
    reference = _reference_geometry(params.get("Reference image geometry"))
    if reference is not None:
        ref_geometry, ref_extent = reference
        ref_shape = tuple(ref_extent[2 * a + 1] - ref_extent[2 * a] + 1 for a in range(3))
        if all(s > 0 for s in ref_shape) and ref_geometry.same_axes(geometry):
            start = np.array(offset) - np.array(ref_extent[0::2])
            result = _place(result, ref_shape, tuple(int(v) for v in start))  # type: ignore[arg-type]
    return result


def _place(data: SegmentationData, shape: Tuple[int, int, int], start: Tuple[int, int, int]) -> SegmentationData:
    """Put ``data.layers`` (whose first voxel is at index ``start`` of a grid of ``shape``) onto that grid."""
    out = np.zeros((data.layers.shape[0], *shape), dtype=data.layers.dtype)
    src, dst = [], []
    for a in range(3):
        lo = max(0, start[a])
        hi = min(shape[a], start[a] + data.layers.shape[a + 1])
        if hi <= lo:
            src = []
            break
        dst.append(slice(lo, hi))
        src.append(slice(lo - start[a], hi - start[a]))
    if src:
        out[(slice(None), *dst)] = data.layers[(slice(None), *src)]
    segments = []
    for s in data.segments:
        extent = s.extent
        if extent is None:
            extent = (0, data.layers.shape[1] - 1, 0, data.layers.shape[2] - 1, 0, data.layers.shape[3] - 1)
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            moved: Extent = EMPTY_EXTENT
        else:
            moved = tuple(int(extent[i] + start[i // 2]) for i in range(6))  # type: ignore[assignment]
        segments.append(replace(s, extent=moved, tags=dict(s.tags)))
    return SegmentationData(
        layers=out,
        segments=segments,
        geometry=data.geometry.shifted(-np.asarray(start, dtype=np.float64)),
        reference_extent_offset=(0, 0, 0),
        reference_shape=tuple(int(v) for v in shape),  # type: ignore[arg-type]
        fields=dict(data.fields),
    )


# --------------------------------------------------------------------------------------------------- by name


def _match_names(names: Iterable[str], name_to_value: Mapping[str, int]) -> Dict[str, str]:
    """Segment name -> server name: exact, else the unique server name equal after :func:`normalize_name`."""
    normalized: Dict[str, List[str]] = {}
    for server_name in name_to_value:
        normalized.setdefault(normalize_name(server_name), []).append(server_name)
    out: Dict[str, str] = {}
    for name in names:
        if name in name_to_value:
            out[name] = name
            continue
        candidates = normalized.get(normalize_name(name), [])
        if len(candidates) == 1:
            out[name] = candidates[0]
    return out


def build_labelmap(
    data: SegmentationData,
    name_to_value: Mapping[str, int],
    reference_shape: Optional[Sequence[int]] = None,
) -> LabelMapBuild:
    """An integer label map holding, for every segment, the server's value of the segment's *name*.

    Segment order and Slicer's own label values play no role. Names are matched exactly, or ignoring case,
    blanks and hyphens when that is unambiguous (``"Kidney left"`` -> ``kidney_left``). Segments whose name the
    server does not know are left out of the map and listed in ``unknown_names`` for the caller to report.
    Where segments overlap the later layer wins (later segment within a layer); ``overlap_voxels`` counts them.
    With ``reference_shape`` the layers are placed at ``data.reference_extent_offset`` on a grid of that shape.
    """
    if reference_shape is not None and tuple(reference_shape) != data.shape:
        target = (int(reference_shape[0]), int(reference_shape[1]), int(reference_shape[2]))
        data = _place(data, target, data.reference_extent_offset)
    values = [int(v) for v in name_to_value.values()]
    if any(v <= 0 for v in values):
        raise ValueError(f"label values must be positive: {dict(name_to_value)}")
    dtype = _smallest_uint(max(values, default=0))
    labelmap = np.zeros(data.shape, dtype=dtype)
    matched = _match_names(data.names, name_to_value)
    unknown: List[str] = []
    overlap = 0
    counts: Dict[str, int] = {}
    order = sorted(range(len(data.segments)), key=lambda i: (data.segments[i].layer, i))
    for i in order:
        seg = data.segments[i]
        server_name = matched.get(seg.name)
        if server_name is None:
            if seg.name not in unknown:
                unknown.append(seg.name)
            continue
        value = int(name_to_value[server_name])
        mask = data.mask(seg)
        overlap += int(np.count_nonzero(mask & (labelmap != 0) & (labelmap != value)))
        labelmap[mask] = value
    for server_name, value in name_to_value.items():
        counts[server_name] = int(np.count_nonzero(labelmap == int(value)))
    used = {matched[n] for n in data.names if n in matched}
    empty = [n for n in name_to_value if n in used and counts[n] == 0]
    return LabelMapBuild(
        labelmap=labelmap,
        unknown_names=unknown,
        overlap_voxels=overlap,
        voxels_per_name={n: c for n, c in counts.items() if n in used},
        empty_names=empty,
        matched={n: s for n, s in matched.items() if n != s},
    )


def labelmap_from_segments(
    data: SegmentationData,
    name_to_value: Mapping[str, int],
    reference_shape: Optional[Sequence[int]] = None,
) -> Tuple[np.ndarray, List[str]]:
    """``(label map, unknown segment names)``; see :func:`build_labelmap` (which also reports overlaps)."""
    build = build_labelmap(data, name_to_value, reference_shape)
    return build.labelmap, build.unknown_names


def segments_from_labelmap(
    labelmap: np.ndarray,
    name_to_value: Mapping[str, int],
    colors: Optional[Union[Mapping[str, Sequence[float]], Callable[[str], RGB]]] = None,
    include_empty: bool = True,
) -> Tuple[List[SegmentInfo], List[int]]:
    """Named, colored segments for a server label map, and the values present that no name maps to.

    Segments are ordered by value; with ``include_empty`` every known structure gets a segment even when the
    label map has none of it, so that the annotator can paint it. Unknown values are *not* turned into segments:
    the caller must zero them (see :func:`clear_values`) before writing and should report them.
    """
    present = {int(v) for v in np.unique(labelmap)} - {0}
    value_to_name: Dict[int, str] = {}
    for name, value in name_to_value.items():
        value_to_name.setdefault(int(value), name)
    segments = []
    for value in sorted(value_to_name):
        name = value_to_name[value]
        if include_empty or value in present:
            segments.append(
                SegmentInfo(name=name, label_value=value, color=_color_of(name, colors), id=_segment_id(name))
            )
    unknown = sorted(present - set(value_to_name))
    return segments, unknown


def _segment_id(name: str) -> str:
    ident = re.sub(r"[^A-Za-z0-9_.\-]+", "_", name).strip("_")
    return ident or "Segment"


def clear_values(labelmap: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """A copy of ``labelmap`` with ``values`` set to 0."""
    out = np.array(labelmap, copy=True)
    values = list(values)
    if values:
        out[np.isin(out, values)] = 0
    return out


# --------------------------------------------------------------------------------------------------- NIfTI/images


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_image_geometry(path: Union[str, os.PathLike]) -> Tuple[Tuple[int, int, int], Geometry]:
    """Size (x, y, z) and geometry of an image file (header only)."""
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    reader.ReadImageInformation()
    if reader.GetDimension() != 3:
        raise ValueError(f"{os.path.basename(os.fspath(path))}: expected a 3D image, got {reader.GetDimension()}D")
    geometry = Geometry.create(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    return tuple(int(s) for s in reader.GetSize()), geometry  # type: ignore[return-value]


def read_labelmap(path: Union[str, os.PathLike]) -> Tuple[np.ndarray, Geometry]:
    """An integer label map file (NIfTI, NRRD, ...) as an (x, y, z) array and its geometry. A file that is not one
    (unreadable, not 3D, or holding fractions or negative values, as a scan does) raises
    :class:`SegmentationFileError` naming the file."""
    sitk = _sitk()
    name = os.path.basename(os.fspath(path))
    try:
        image = sitk.ReadImage(os.fspath(path))
    except RuntimeError as e:
        raise SegmentationFileError(f"{name}: not a readable image file") from e
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise SegmentationFileError(f"{name}: expected a 3D single-component label map")
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.mod(array, 1) == 0):
            raise SegmentationFileError(f"{name}: label map holds non-integer values")
        array = array.astype(np.int64)
    if array.size and int(array.min()) < 0:
        raise SegmentationFileError(f"{name}: label map holds negative values (is it the scan, not its label?)")
    array = array.astype(_smallest_uint(int(array.max()) if array.size else 0))
    return array, Geometry.create(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def write_labelmap(
    path: Union[str, os.PathLike],
    labelmap: np.ndarray,
    geometry: Geometry,
    reference_image: Optional[Union[str, os.PathLike]] = None,
) -> str:
    """Write an (x, y, z) label map (NIfTI when the path ends in ``.nii.gz``/``.nii``) atomically.

    With ``reference_image`` the header is copied bit for bit from that image's (its size must match), so the
    server's "same grid" check sees exactly the image's numbers.
    """
    sitk = _sitk()
    arr = np.asarray(labelmap)
    arr = arr.astype(_smallest_uint(int(arr.max()) if arr.size else 0), copy=False)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(arr, (2, 1, 0))))
    if reference_image is not None:
        size, ref = read_image_geometry(reference_image)
        if tuple(size) != tuple(arr.shape):
            raise ValueError(f"label map shape {arr.shape} does not match the image size {size}")
        reader = sitk.ImageFileReader()
        reader.SetFileName(os.fspath(reference_image))
        reader.ReadImageInformation()
        image.SetSpacing(reader.GetSpacing())
        image.SetOrigin(reader.GetOrigin())
        image.SetDirection(reader.GetDirection())
    else:
        image.SetSpacing(tuple(float(v) for v in geometry.spacing))
        image.SetOrigin(tuple(float(v) for v in geometry.origin))
        image.SetDirection(geometry.sitk_direction())
    path = os.fspath(path)
    name = os.path.basename(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".part-{os.getpid()}-{name}")
    try:
        sitk.WriteImage(image, tmp, True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def place_on_grid(
    data: SegmentationData, shape: Sequence[int], geometry: Geometry, tolerance_voxels: float = 1e-3
) -> SegmentationData:
    """``data`` expressed on another grid (usually the image's): shifted by whole voxels when the grids share
    spacing and axes (exact), otherwise resampled with nearest neighbour (extents are then recomputed)."""
    shape = tuple(int(v) for v in shape)
    if data.geometry.same_axes(geometry):
        start = geometry.continuous_index(data.geometry.origin)
        rounded = np.rint(start)
        if np.all(np.abs(start - rounded) <= tolerance_voxels):
            placed = replace(data, reference_extent_offset=(0, 0, 0))
            out = _place(placed, shape, tuple(int(v) for v in rounded))  # type: ignore[arg-type]
            return replace(out, geometry=geometry)
    data = _within_extents(data)
    sitk = _sitk()
    reference = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(v) for v in geometry.spacing))
    reference.SetOrigin(tuple(float(v) for v in geometry.origin))
    reference.SetDirection(geometry.sitk_direction())
    layers = []
    for layer in data.layers:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(layer, (2, 1, 0))))
        image.SetSpacing(tuple(float(v) for v in data.geometry.spacing))
        image.SetOrigin(tuple(float(v) for v in data.geometry.origin))
        image.SetDirection(data.geometry.sitk_direction())
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        layers.append(np.transpose(sitk.GetArrayFromImage(resampled), (2, 1, 0)).astype(data.layers.dtype))
    new_layers = np.stack(layers) if layers else np.zeros((0, *shape), dtype=np.uint8)
    segments = [replace(s, extent=None, tags=dict(s.tags)) for s in data.segments]
    grid = (shape[0], shape[1], shape[2])
    return SegmentationData(new_layers, segments, geometry, (0, 0, 0), grid, dict(data.fields))


def _within_extents(data: SegmentationData) -> SegmentationData:
    """A copy whose layers hold each segment's voxels only inside its extent (extents then become "whole")."""
    if all(s.extent is None for s in data.segments):
        return data
    layers = np.zeros_like(data.layers)
    for seg in data.segments:
        layers[seg.layer][data.mask(seg)] = seg.label_value
    segments = [replace(s, extent=None, tags=dict(s.tags)) for s in data.segments]
    return replace(data, layers=layers, segments=segments)
