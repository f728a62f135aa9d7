"""A local datastore that refuses bad uploads before anything is written.

Uploaded images must be readable; labels must be readable, lie on their image's exact grid and hold only
configured label values; ids and tags must be plain names (no path tricks). A refused upload raises a 4xx
that names the problem and leaves the datastore as it was. Accepted files are written atomically.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, Optional

import numpy as np
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from labelloop_app.class_labels import CLASS_TAG, ClassLabelCheck, discover_class_labels, save_class_label
from labelloop_app.errors import BadRequest, Conflict, NotFound, UnprocessableInput
from labelloop_app.geometry import UnreadableImageError, label_array, read_geometry, read_image

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


def check_name(kind: str, value: str) -> str:
    """An id or tag must be a plain file-name stem: letters, digits, ``_ . -``, no ``..``, no separators."""
    if not isinstance(value, str) or not _NAME.match(value) or ".." in value:
        raise BadRequest(
            f"invalid {kind} {value!r}: use 1-200 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return value


def describe_values(labels: Dict[str, int]) -> str:
    return ", ".join(f"{n}={v}" for n, v in labels.items())


def present_values(values: np.ndarray) -> np.ndarray:
    """The distinct values of a label map (a histogram for small unsigned types: several times faster than sorting)."""
    if values.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(values.ravel()))
    return np.unique(values)


class SegmentationLabelCheck:
    """Label map on the image's grid with values among ``{0} U labels.values()``.

    ``values``, when the caller holds the label map it has just written (batch inference), are checked in memory
    instead of decompressing the file again; the grid is then read from the file's header alone."""

    def __init__(self, labels: Dict[str, int]):
        self.labels = dict(labels)
        self.allowed = np.array(sorted({0, *self.labels.values()}))

    def __call__(
        self,
        image_id: str,
        image_path: str,
        label_path: str,
        info: Dict[str, Any],
        values: Optional[np.ndarray] = None,
    ) -> None:
        try:
            if values is None:
                values, geometry = label_array(label_path)
            else:
                geometry = read_geometry(label_path)
        except UnreadableImageError as e:
            raise UnprocessableInput(f"cannot read the label for image {image_id!r}: {e}") from e
        image_geometry = read_geometry(image_path)
        problems = image_geometry.mismatches(geometry)
        if problems:
            raise UnprocessableInput(
                f"label geometry does not match image {image_id!r}: " + "; ".join(problems) + " (label != image)"
            )
        present = present_values(values)
        unknown = np.setdiff1d(present, self.allowed)
        if unknown.size:
            raise UnprocessableInput(
                f"label for image {image_id!r} has values {unknown.tolist()} that name no configured structure; "
                f"valid: 0=background, {describe_values(self.labels)}"
            )


class LabelLoopDatastore(LocalDatastore):
    """:class:`LocalDatastore` with validation and atomic writes; ``label_check`` validates label files."""

    def __init__(
        self,
        *args,
        label_check: Optional[Callable[..., None]] = None,
        class_check: Optional[ClassLabelCheck] = None,
        **kwargs,
    ):
        self.class_check = class_check  # set first: the base class reconciles (and reads class labels) on init
        super().__init__(*args, **kwargs)
        self.label_check = label_check

    def _extension_of(self, filename: str) -> str:
        name = os.path.basename(filename).lower()
        for pattern in self._extensions:
            ext = pattern.replace("*", "")
            if name.endswith(ext.lower()):
                return ext
        allowed = ", ".join(e.replace("*", "") for e in self._extensions)
        raise UnprocessableInput(f"unsupported file type {os.path.basename(filename)!r}; expected one of: {allowed}")

    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        ext = self._extension_of(image_filename)
        if not image_id:
            image_id = os.path.basename(image_filename)[: -len(ext)]
        check_name("image id", image_id)
        if image_id in self._datastore.objects:
            raise Conflict(f"image {image_id!r} already exists in the datastore; remove it first to replace it")
        try:
            read_image(image_filename)
        except UnreadableImageError as e:
            raise UnprocessableInput(f"cannot read image {image_id!r}: {e}") from e

        name = image_id + ext
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        with FileLock(self._lock_file):
            _atomic_copy(image_filename, dest)
            info = dict(image_info or {})
            info.update({"ts": int(time.time()), "name": name})
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
            self._update_datastore_file(lock=False)
        return image_id

    def save_label(
        self,
        image_id: str,
        label_filename: str,
        label_tag: str,
        label_info: Dict[str, Any],
        values: Optional[np.ndarray] = None,
    ) -> str:
        """Store a label file under ``label_tag`` after checking it; ``values``: the file's voxel values when the
        caller holds them, checked in memory (see :class:`SegmentationLabelCheck`)."""
        check_name("label tag", label_tag)
        if label_tag == CLASS_TAG:  # image-level class: a JSON file, see labelloop_app.class_labels
            if self.class_check is None:
                raise BadRequest(
                    f"'{CLASS_TAG}' labels need the classification task: start the server with "
                    "--conf tasks classification (or segmentation,classification)"
                )
            return save_class_label(self, self.class_check, image_id, label_filename, label_info)
        obj = self.require_image(image_id)
        ext = self._extension_of(label_filename)
        if self.label_check is not None:
            self.label_check(image_id, self.get_image_uri(image_id), label_filename, label_info or {}, values)

        label_dir = self._datastore.label_path(label_tag)
        dest = os.path.join(label_dir, image_id + ext)
        with FileLock(self._lock_file):
            os.makedirs(label_dir, exist_ok=True)
            previous = obj.labels.get(label_tag)
            _atomic_copy(label_filename, dest)
            if previous is not None and previous.ext != ext:
                stale = os.path.join(label_dir, image_id + previous.ext)
                if os.path.exists(stale):
                    os.remove(stale)
            info = dict(label_info or {})
            info.update({"ts": int(time.time()), "name": image_id + ext})
            obj.labels[label_tag] = DataModel(info=info, ext=ext)
            self._update_datastore_file(lock=False)
        return image_id

    def _add_non_existing_labels(self, tag) -> int:
        added = super()._add_non_existing_labels(tag)
        if tag == CLASS_TAG:
            added += discover_class_labels(self, getattr(self, "class_check", None))
        return added

    def require_image(self, image_id: str) -> ImageLabelModel:
        """The stored image ``image_id``, or a 404 naming it (a 400 for an id that could not be one; files put in the
        studies folder by hand may have names an upload could not, and stay reachable)."""
        obj = self._datastore.objects.get(image_id)
        if obj is None:
            check_name("image id", image_id)
            raise NotFound(f"image {image_id!r} is not in the datastore")
        return obj

    def require_label(self, label_id: str, label_tag: str) -> None:
        """A 404 naming the label unless image ``label_id`` has a ``label_tag`` label."""
        self.require_image(label_id)
        if not self.get_label_uri(label_id, label_tag):
            check_name("label tag", label_tag)
            raise NotFound(f"no {label_tag!r} label for image {label_id!r}")

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        self.require_image(image_id)
        super().update_image_info(image_id, info)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        self.require_label(label_id, label_tag)
        super().update_label_info(label_id, label_tag, info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self.require_label(label_id, label_tag)
        super().remove_label(label_id, label_tag)
        if label_tag == CLASS_TAG and self._auto_reload:
            self.refresh()  # the file watcher follows image files only, not the class labels' JSON

    def remove_image(self, image_id: str) -> None:
        self.require_image(image_id)
        super().remove_image(image_id)


def _atomic_copy(src: str, dest: str) -> None:
    directory, base = os.path.split(dest)
    tmp = os.path.join(directory, f".upload-{os.getpid()}-{base}.part")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
