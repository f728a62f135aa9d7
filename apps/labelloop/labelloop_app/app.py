"""The LabelLoop MONAI Label app: tasks configured by ``--conf``, a validating datastore, clear 4xx errors."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Dict

import torch
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.batch_infer import BatchInferTask
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

import labelloop_app
from labelloop_app.api import install_routes, require
from labelloop_app.conf import SegmentationConf, parse_tasks
from labelloop_app.datastore import LabelLoopDatastore, SegmentationLabelCheck, check_name
from labelloop_app.errors import NotFound
from labelloop_app.infer_segmentation import SegmentationInfer
from labelloop_app.networks import segmentation_network
from labelloop_app.train_segmentation import SegmentationTrain

logger = logging.getLogger(__name__)


def _is_uploaded_file(path: str) -> bool:
    """The infer endpoint stores an uploaded image as a temporary file and passes its path as ``image``."""
    tmp = os.path.realpath(tempfile.gettempdir())
    return os.path.isabs(path) and os.path.dirname(os.path.realpath(path)) == tmp and os.path.isfile(path)


class CpuSafeBatchInfer(BatchInferTask):
    """MONAI Label's batch inference, which divides by the CUDA device count unless told ``multi_gpu=false``."""

    def __call__(self, request, datastore, infer):
        request = dict(request)
        if not torch.cuda.is_available():
            request["multi_gpu"] = False
        return super().__call__(request, datastore, infer)


class LabelLoopApp(MONAILabelApp):
    """Segmentation of CT/MR organs with active learning; see the README for every ``--conf`` option."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        self.tasks = parse_tasks(conf.get("tasks"))
        self.seg_conf = SegmentationConf.from_conf(conf)
        default_model_dir = (
            os.path.join(app_dir, "model")
            if studies.startswith(("http://", "https://"))
            else os.path.join(studies, ".labelloop", "model")
        )
        self.model_dir = os.path.abspath(conf.get("model_dir") or default_model_dir)
        os.makedirs(self.model_dir, exist_ok=True)
        self.seg_network = segmentation_network(self.seg_conf.network, self.seg_conf.out_channels)
        self.seg_model_path = os.path.join(self.model_dir, f"segmentation_{self.seg_conf.network}.pt")

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LabelLoop",
            description="Annotate, retrain and infer CT/MR segmentation with active learning",
            version=labelloop_app.__version__,
            labels=dict(self.seg_conf.labels),
        )
        install_routes(lambda: self._trainers, lambda: self._infers)

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return LabelLoopDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            label_check=SegmentationLabelCheck(self.seg_conf.labels),
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        if "segmentation" in self.tasks:
            infers["segmentation"] = SegmentationInfer(self.seg_conf, self.seg_model_path, self.seg_network)
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        if "segmentation" in self.tasks:
            trainers["segmentation"] = SegmentationTrain(
                self.seg_conf,
                model_dir=os.path.join(self.model_dir, "segmentation"),
                network=self.seg_network,
                publish_path=self.seg_model_path,
            )
        return trainers

    def init_batch_infer(self):
        return CpuSafeBatchInfer()

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        require("model", request.get("model", ""), self._infers)
        image = request.get("image")
        if isinstance(image, str) and not (datastore or self.datastore()).get_image_uri(image):
            if not _is_uploaded_file(image):
                check_name("image id", image)
                raise NotFound(f"image {image!r} is not in the datastore")
        return super().infer(request, datastore)

    def next_sample(self, request):
        require("strategy", request.get("strategy", ""), self._strategies)
        return super().next_sample(request)
