"""Image-level class labels: one convention shared by the server, the Slicer extension and the command line.

Convention
----------
A class label is a label with the tag ``class`` whose file is a tiny JSON document naming the class::

    PUT /datastore/label?image=<id>&tag=class
        label  = <id>.json containing {"class": "lesion"}
        params = {"label_info": {"class": "lesion"}}        (optional; must agree with the file when both are given)

The server stores it as ``labels/class/<id>.json`` (always rewritten as ``{"class": "<name>"}``) and copies the
class into the label's info in ``datastore_v2.json``. ``GET /labelloop/classes`` lists every image's class with
counts per class; ``DELETE /datastore/label?id=<id>&tag=class`` removes one.

Why this form:

- **A tag of its own.** MONAI Label's ``datalist()`` (what segmentation trains on) and the segmentation label check
  read only ``final``; with ``class`` beside it both tasks share one studies folder without seeing each other's
  labels, and one image can have an organ segmentation *and* a class.
- **A few bytes of JSON, not a volume.** MONAI Label's upload endpoint requires a file; a label-map "image" per
  class would cost megabytes and a geometry check for nothing. The JSON file is self-describing, so a studies
  folder keeps its classes even without ``datastore_v2.json``: the datastore reads the files back when it
  reconciles (see :func:`discover_class_labels`), and the sample-data generator simply writes them.
- **Listing reads no file.** The class is in the label info of ``datastore_v2.json``, which the server keeps in
  memory; listing every class label is a dictionary walk.

An unknown class name is refused with a 422 that names the valid classes, and the datastore stays as it was.

Findings (optional)
-------------------
A class label may also say *where* the class shows: a list of marks, each a centre in physical LPS millimetres
(the coordinates of ITK, DICOM and the image file; Slicer's RAS with x and y negated) and a radius::

    {"class": "lesion", "findings": [{"centre_lps": [-82.4, -2.6, 35.0], "radius_mm": 12.0}]}

They may come in the file or in ``label_info`` (``{"class": "lesion", "findings": [...]}``); when both carry them
they must agree. Each centre must lie inside the image; a radius is in (0, 500] mm; at most 100 marks. They are
stored in the file and in the label info (``GET /labelloop/classes`` counts them per image), so that a trainer
can learn from a mark where the evidence is instead of from the image-level class alone. A label without the key
has no findings; ``[]`` says explicitly that there is nothing to mark.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import SimpleITK as sitk
from fastapi import APIRouter, Depends
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.local import DataModel
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import Datastore

from labelloop_app.errors import NotFound, UnprocessableInput
from labelloop_app.geometry import Geometry, UnreadableImageError, read_geometry

logger = logging.getLogger(__name__)

CLASS_TAG = "class"
"""Label tag of image-level class labels."""

CLASS_EXT = ".json"
"""Extension of a class label file."""

CLASS_KEY = "class"
"""Key of the class name in the label file and in the label info."""

FINDINGS_KEY = "findings"
"""Key of the optional marks (``[{"centre_lps": [x, y, z], "radius_mm": r}, ...]``) in the file and label info."""

MAX_FINDINGS = 100
MAX_RADIUS_MM = 500.0
FINDING_FORM = '{"centre_lps": [x, y, z], "radius_mm": r}'

Finding = Dict[str, Any]


def parse_findings(raw: Any) -> Optional[List[Finding]]:
    """Validated findings in canonical form (``None`` when ``raw`` is); ValueError naming the entry at fault."""
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f'"{FINDINGS_KEY}" must be a list of {FINDING_FORM}, got {type(raw).__name__}')
    if len(raw) > MAX_FINDINGS:
        raise ValueError(f'"{FINDINGS_KEY}" holds {len(raw)} marks; at most {MAX_FINDINGS} are allowed')
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or set(item) != {"centre_lps", "radius_mm"}:
            raise ValueError(f"finding {i} must be exactly {FINDING_FORM}, got {item!r}")
        centre, radius = item["centre_lps"], item["radius_mm"]
        try:
            point = [float(v) for v in centre] if isinstance(centre, (list, tuple)) else []
            size = float(radius) if not isinstance(radius, (bool, str)) else math.nan
        except (TypeError, ValueError):
            point, size = [], math.nan
        if len(point) != 3 or not all(math.isfinite(v) for v in point):
            raise ValueError(f'finding {i}: "centre_lps" needs 3 finite numbers (mm), got {centre!r}')
        if not (math.isfinite(size) and 0.0 < size <= MAX_RADIUS_MM):
            raise ValueError(f'finding {i}: "radius_mm" must be a number in (0, {MAX_RADIUS_MM:g}], got {radius!r}')
        out.append({"centre_lps": [round(v, 3) for v in point], "radius_mm": round(size, 3)})
    return out


def findings_outside(findings: Sequence[Finding], geometry: Geometry) -> List[int]:
    """Indices of the findings whose centre lies outside the image's voxels (half a voxel beyond the corners)."""
    image = sitk.Image([1, 1, 1], sitk.sitkUInt8)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    outside = []
    for i, f in enumerate(findings):
        index = image.TransformPhysicalPointToContinuousIndex([float(v) for v in f["centre_lps"]])
        if any(not (-0.5 <= x <= n - 0.5) for x, n in zip(index, geometry.size)):
            outside.append(i)
    return outside


def class_document(name: str, findings: Optional[Sequence[Finding]] = None) -> Dict[str, Any]:
    """The content of a class label file."""
    doc: Dict[str, Any] = {CLASS_KEY: name}
    if findings is not None:
        doc[FINDINGS_KEY] = list(findings)
    return doc


def write_class_label(path: str, name: str, findings: Optional[Sequence[Finding]] = None) -> None:
    """Write ``{"class": name}`` (with ``"findings"`` when given) atomically (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "w") as f:
            json.dump(class_document(name, findings), f)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_class_label(path: str) -> Optional[str]:
    """The class a label file names; ``None`` for an empty file; ValueError when it is not ``{"class": name}``."""
    return read_class_document(path)[0]


def read_class_document(path: str) -> Tuple[Optional[str], Optional[List[Finding]]]:
    """The class and findings of a label file (``None`` where absent); ValueError naming what is malformed."""
    with open(path, "rb") as f:
        raw = f.read(1 << 20)
    if not raw.strip():
        return None, None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError('a class label file must be JSON like {"class": "<name>"}') from e
    if not isinstance(doc, dict):
        raise ValueError('a class label file must be a JSON object like {"class": "<name>"}')
    name = doc.get(CLASS_KEY)
    if name is not None and not isinstance(name, str):
        raise ValueError(f'"class" must be a string, got {name!r}')
    return name, parse_findings(doc.get(FINDINGS_KEY))


def _from_info(label_info: Optional[Mapping[str, Any]], key: str) -> Any:
    """``label_info[key]`` of upload parameters, from ``{"label_info": {key: ...}}`` or ``{key: ...}``."""
    info = dict(label_info or {})
    nested = info.get("label_info")
    if isinstance(nested, Mapping) and nested.get(key) is not None:
        return nested[key]
    return info.get(key)


def class_from_info(label_info: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The class named by upload parameters: ``{"label_info": {"class": name}}`` or ``{"class": name}``."""
    name = _from_info(label_info, CLASS_KEY)
    return None if name is None else str(name)


def findings_from_info(label_info: Optional[Mapping[str, Any]]) -> Optional[List[Finding]]:
    """The validated findings of upload parameters (``None`` when they give none); ValueError when malformed."""
    return parse_findings(_from_info(label_info, FINDINGS_KEY))


class ClassLabelCheck:
    """Validates an uploaded class label against the configured class names and returns the class."""

    def __init__(self, classes: Sequence[str]):
        self.classes = list(classes)

    def valid(self) -> str:
        return ", ".join(self.classes)

    def check_name(self, image_id: str, name: Optional[str]) -> str:
        if name not in self.classes:
            raise UnprocessableInput(
                f"unknown class {name!r} for image {image_id!r}; valid classes: {self.valid()}"
                if name is not None
                else f"the class label for image {image_id!r} names no class: send a {CLASS_EXT} file "
                f'{{"class": "<name>"}} (and/or params {{"label_info": {{"class": "<name>"}}}}); '
                f"valid classes: {self.valid()}"
            )
        return name

    def __call__(
        self, image_id: str, label_path: str, label_info: Optional[Mapping[str, Any]]
    ) -> Tuple[str, Optional[List[Finding]]]:
        """The class and findings of an upload; UnprocessableInput naming the problem."""
        try:
            from_file, marks_file = read_class_document(label_path)
        except ValueError as e:
            raise UnprocessableInput(f"cannot read the class label for image {image_id!r}: {e}") from e
        try:
            marks_info = findings_from_info(label_info)
        except ValueError as e:
            raise UnprocessableInput(f"bad findings in label_info for image {image_id!r}: {e}") from e
        from_info = class_from_info(label_info)
        if from_file is not None and from_info is not None and from_file != from_info:
            raise UnprocessableInput(
                f"the class label for image {image_id!r} names {from_file!r} in the file but {from_info!r} in "
                "label_info; send one class"
            )
        if marks_file is not None and marks_info is not None and marks_file != marks_info:
            raise UnprocessableInput(
                f"the class label for image {image_id!r} has other findings in the file than in label_info; "
                "send them once"
            )
        name = self.check_name(image_id, from_file if from_file is not None else from_info)
        return name, marks_file if marks_file is not None else marks_info

    @staticmethod
    def check_inside(image_id: str, findings: Sequence[Finding], geometry: Geometry) -> None:
        """UnprocessableInput when a finding's centre lies outside the image."""
        outside = findings_outside(findings, geometry)
        if outside:
            raise UnprocessableInput(
                f"finding {outside[0]} of image {image_id!r} lies outside the image: centre_lps "
                f"{findings[outside[0]]['centre_lps']} mm is beyond its {'x'.join(map(str, geometry.size))} "
                "voxels (centres are physical LPS millimetres)"
            )


# --- the datastore side (LocalDatastore internals, as labelloop_app.datastore uses them) ---------------------


def save_class_label(datastore, check: ClassLabelCheck, image_id: str, label_filename: str, label_info: Dict) -> str:
    """Validate, then write ``labels/class/<id>.json`` and the label info atomically; the datastore is unchanged
    when the label is refused."""
    obj = datastore._datastore.objects.get(image_id)
    if not obj:
        raise NotFound(f"image {image_id!r} is not in the datastore")
    name, findings = check(image_id, label_filename, label_info)
    if findings:
        try:
            geometry = read_geometry(datastore.get_image_uri(image_id))
        except UnreadableImageError as e:
            raise UnprocessableInput(f"cannot place findings on image {image_id!r}: {e}") from e
        check.check_inside(image_id, findings, geometry)
    label_dir = datastore._datastore.label_path(CLASS_TAG)
    with FileLock(datastore._lock_file):
        write_class_label(os.path.join(label_dir, image_id + CLASS_EXT), name, findings)
        info = {k: v for k, v in dict(label_info or {}).items() if k not in ("label_info", FINDINGS_KEY)}
        info.update({CLASS_KEY: name, "ts": int(time.time()), "name": image_id + CLASS_EXT})
        if findings is not None:
            info[FINDINGS_KEY] = findings
        obj.labels[CLASS_TAG] = DataModel(info=info, ext=CLASS_EXT)
        datastore._update_datastore_file(lock=False)
    return image_id


def discover_class_labels(datastore, check: Optional[ClassLabelCheck]) -> int:
    """Add class label files the datastore does not list yet (e.g. written by the sample-data generator), reading
    the class from each file; files naming an unknown class are skipped with a warning. Returns how many."""
    label_dir = datastore._datastore.label_path(CLASS_TAG)
    if check is None or not os.path.isdir(label_dir):
        return 0
    added = 0
    for file in sorted(os.listdir(label_dir)):
        if not file.endswith(CLASS_EXT) or file.startswith("."):
            continue
        image_id = file[: -len(CLASS_EXT)]
        obj = datastore._datastore.objects.get(image_id)
        if obj is None or CLASS_TAG in obj.labels:
            continue
        try:
            name, findings = read_class_document(os.path.join(label_dir, file))
        except (OSError, ValueError) as e:
            logger.warning("Ignoring class label %s: %s", file, e)
            continue
        if name not in check.classes:
            logger.warning("Ignoring class label %s: class %r is not one of %s", file, name, check.valid())
            continue
        info = {CLASS_KEY: name, "ts": int(time.time()), "name": file}
        if findings is not None:
            info[FINDINGS_KEY] = findings
        obj.labels[CLASS_TAG] = DataModel(info=info, ext=CLASS_EXT)
        added += 1
    return added


def class_labels_of(datastore: Datastore) -> Dict[str, str]:
    """``{image_id: class}`` of every image with a class label, from the datastore's label info (no file read)."""
    local = getattr(datastore, "_datastore", None)
    if local is not None and hasattr(local, "objects"):
        if hasattr(datastore, "_init_from_datastore_file"):
            datastore._init_from_datastore_file()  # re-reads datastore_v2.json only when another process changed it
        return {
            image_id: str(obj.labels[CLASS_TAG].info.get(CLASS_KEY))
            for image_id, obj in sorted(local.objects.items())
            if CLASS_TAG in obj.labels and obj.labels[CLASS_TAG].info.get(CLASS_KEY) is not None
        }
    out = {}
    for image_id in sorted(datastore.get_labeled_images(label_tag=CLASS_TAG)):
        name = class_from_info(datastore.get_label_info(image_id, CLASS_TAG))
        if name is not None:
            out[image_id] = name
    return out


def class_findings_of(datastore: Datastore) -> Dict[str, List[Finding]]:
    """``{image_id: findings}`` of every class label that carries the key (possibly ``[]``), from the label info."""
    out = {}
    for image_id in class_labels_of(datastore):  # also refreshes the datastore from its file
        marks = (datastore.get_label_info(image_id, CLASS_TAG) or {}).get(FINDINGS_KEY)
        if marks is not None:
            out[image_id] = marks
    return out


def class_summary(datastore: Datastore, classes: Sequence[str]) -> Dict[str, Any]:
    """What ``GET /labelloop/classes`` returns: the classes, every image's class, counts, labeled/unlabeled, and
    how many findings each image's label marks (only images whose label has the key)."""
    labels = class_labels_of(datastore)
    counts = {name: 0 for name in classes}
    for name in labels.values():
        counts[name] = counts.get(name, 0) + 1
    total = len(datastore.list_images())
    return {
        "classes": list(classes),
        "labels": labels,
        "counts": counts,
        "labeled": len(labels),
        "unlabeled": total - len(labels),
        "total": total,
        "tag": CLASS_TAG,
        "findings": {image_id: len(marks) for image_id, marks in class_findings_of(datastore).items()},
    }


def build_classes_router(classes: Sequence[str], datastore: Callable[[], Datastore]) -> APIRouter:
    """``GET /labelloop/classes``: ``{"classes", "labels": {image_id: class}, "counts": {class: n}, ...}``."""
    router = APIRouter()
    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))

    @router.get("/labelloop/classes", summary="Image-level class labels: every labeled image's class and counts")
    async def list_classes(user: User = user_role):
        return class_summary(datastore(), classes)

    return router
