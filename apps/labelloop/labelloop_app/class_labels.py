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
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from fastapi import APIRouter, Depends
from filelock import FileLock
from monailabel.config import settings
from monailabel.datastore.local import DataModel
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import Datastore

from labelloop_app.errors import NotFound, UnprocessableInput

logger = logging.getLogger(__name__)

CLASS_TAG = "class"
"""Label tag of image-level class labels."""

CLASS_EXT = ".json"
"""Extension of a class label file."""

CLASS_KEY = "class"
"""Key of the class name in the label file and in the label info."""


def class_document(name: str) -> Dict[str, str]:
    """The content of a class label file."""
    return {CLASS_KEY: name}


def write_class_label(path: str, name: str) -> None:
    """Write ``{"class": name}`` atomically (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "w") as f:
            json.dump(class_document(name), f)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_class_label(path: str) -> Optional[str]:
    """The class a label file names; ``None`` for an empty file; ValueError when it is not ``{"class": name}``."""
    with open(path, "rb") as f:
        raw = f.read(1 << 16)
    if not raw.strip():
        return None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError('a class label file must be JSON like {"class": "<name>"}') from e
    if not isinstance(doc, dict):
        raise ValueError('a class label file must be a JSON object like {"class": "<name>"}')
    name = doc.get(CLASS_KEY)
    if name is not None and not isinstance(name, str):
        raise ValueError(f'"class" must be a string, got {name!r}')
    return name


def class_from_info(label_info: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The class named by upload parameters: ``{"label_info": {"class": name}}`` or ``{"class": name}``."""
    info = dict(label_info or {})
    nested = info.get("label_info")
    if isinstance(nested, Mapping) and nested.get(CLASS_KEY) is not None:
        return str(nested[CLASS_KEY])
    if info.get(CLASS_KEY) is not None:
        return str(info[CLASS_KEY])
    return None


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

    def __call__(self, image_id: str, label_path: str, label_info: Optional[Mapping[str, Any]]) -> str:
        try:
            from_file = read_class_label(label_path)
        except ValueError as e:
            raise UnprocessableInput(f"cannot read the class label for image {image_id!r}: {e}") from e
        from_info = class_from_info(label_info)
        if from_file is not None and from_info is not None and from_file != from_info:
            raise UnprocessableInput(
                f"the class label for image {image_id!r} names {from_file!r} in the file but {from_info!r} in "
                "label_info; send one class"
            )
        return self.check_name(image_id, from_file if from_file is not None else from_info)


# --- the datastore side (LocalDatastore internals, as labelloop_app.datastore uses them) ---------------------


def save_class_label(datastore, check: ClassLabelCheck, image_id: str, label_filename: str, label_info: Dict) -> str:
    """Validate, then write ``labels/class/<id>.json`` and the label info atomically; the datastore is unchanged
    when the label is refused."""
    obj = datastore._datastore.objects.get(image_id)
    if not obj:
        raise NotFound(f"image {image_id!r} is not in the datastore")
    name = check(image_id, label_filename, label_info)
    label_dir = datastore._datastore.label_path(CLASS_TAG)
    with FileLock(datastore._lock_file):
        write_class_label(os.path.join(label_dir, image_id + CLASS_EXT), name)
        info = {k: v for k, v in dict(label_info or {}).items() if k != "label_info"}
        info.update({CLASS_KEY: name, "ts": int(time.time()), "name": image_id + CLASS_EXT})
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
            name = read_class_label(os.path.join(label_dir, file))
        except (OSError, ValueError) as e:
            logger.warning("Ignoring class label %s: %s", file, e)
            continue
        if name not in check.classes:
            logger.warning("Ignoring class label %s: class %r is not one of %s", file, name, check.valid())
            continue
        info = {CLASS_KEY: name, "ts": int(time.time()), "name": file}
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


def class_summary(datastore: Datastore, classes: Sequence[str]) -> Dict[str, Any]:
    """What ``GET /labelloop/classes`` returns: the classes, every image's class, counts, labeled/unlabeled."""
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
    }


def build_classes_router(classes: Sequence[str], datastore: Callable[[], Datastore]) -> APIRouter:
    """``GET /labelloop/classes``: ``{"classes", "labels": {image_id: class}, "counts": {class: n}, ...}``."""
    router = APIRouter()
    user_role = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))

    @router.get("/labelloop/classes", summary="Image-level class labels: every labeled image's class and counts")
    async def list_classes(user: User = user_role):
        return class_summary(datastore(), classes)

    return router
