"""The published model file of a task and the version string clients see for it."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Tuple

import torch
from monailabel.tasks.infer.basic_infer import BasicInferTask

from labelloop_app.errors import ModelNotTrained
from labelloop_app.torch_threads import CPU_THREADS, use_threads


class ModelFile:
    """The published model file and a short version string that changes whenever a new model is published.

    The version is the start of the file's SHA-1, recomputed only when the modification time changes, so that
    asking for it on every request costs one ``stat``.
    """

    def __init__(self, path: str):
        self.path = path
        self._cache: Tuple[float, str] = (-1.0, "")

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def version(self) -> str:
        if not self.exists():
            return ""
        mtime = os.stat(self.path).st_mtime
        if mtime != self._cache[0]:
            h = hashlib.sha1()
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._cache = (mtime, h.hexdigest()[:12])
        return self._cache[1]


class VersionedInferTask(BasicInferTask):
    """A 3D ``BasicInferTask`` whose ``info()`` says whether its model is trained and which version it serves."""

    task_name = "model"
    untrained_hint = "submit labels and start training"
    """What to do when there is no model yet, in the 409 answer."""

    def __init__(self, conf: Any, model_path: str, network: torch.nn.Module, **kwargs):
        super().__init__(path=model_path, network=network, dimension=3, load_strict=True, **kwargs)
        self.conf = conf
        self.model_file = ModelFile(model_path)

    def _get_network(self, device, data):
        if not self.model_file.exists():
            raise ModelNotTrained(
                f"model {self.task_name!r} has not been trained yet: {self.untrained_hint}; inference works as soon as "
                "the first model is published"
            )
        return super()._get_network(device, data)

    def __call__(self, request, callbacks=None):
        if request.get(CPU_THREADS):  # MONAI Label may run the task on a thread of its own inference pool
            use_threads(int(request[CPU_THREADS]))
        return super().__call__(request, callbacks)

    def info(self) -> Dict[str, Any]:
        info = super().info()
        info["trained"] = self.model_file.exists()
        info["model_version"] = self.model_file.version()
        return info
