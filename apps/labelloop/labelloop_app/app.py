"""The LabelLoop MONAI Label app: tasks configured by ``--conf``, a validating datastore, clear 4xx errors."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Dict

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

import labelloop_app
from labelloop_app.activelearning import ActiveLearning, ActiveLearningConf
from labelloop_app.activelearning import build_router as build_al_router
from labelloop_app.api import install_form_json_checks, install_router, install_routes, require, trainings_running
from labelloop_app.batch import InteractiveGate, LabelLoopBatchInfer, build_batch_router
from labelloop_app.class_labels import ClassLabelCheck, build_classes_router
from labelloop_app.conf import ClassificationConf, SegmentationConf, parse_tasks
from labelloop_app.cpu_load import CpuLoad
from labelloop_app.datastore import LabelLoopDatastore, SegmentationLabelCheck, check_name
from labelloop_app.errors import NotFound
from labelloop_app.infer_classification import ClassificationInfer, DetectorInfer
from labelloop_app.infer_segmentation import SegmentationInfer
from labelloop_app.networks import classification_network, segmentation_network
from labelloop_app.request_params import INFER_RULES, STRATEGY_RULES, checked
from labelloop_app.torch_threads import CPU_THREADS, threads_beside
from labelloop_app.train_classification import ClassificationTrain
from labelloop_app.train_detector import DetectorTrain
from labelloop_app.train_segmentation import SegmentationTrain

logger = logging.getLogger(__name__)


def _is_uploaded_file(path: str) -> bool:
    """The infer endpoint stores an uploaded image as a temporary file and passes its path as ``image``."""
    tmp = os.path.realpath(tempfile.gettempdir())
    return os.path.isabs(path) and os.path.dirname(os.path.realpath(path)) == tmp and os.path.isfile(path)


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
        self.cls_conf = ClassificationConf.from_conf(conf)
        self.cls_model_path = os.path.join(self.model_dir, f"classification_{self.cls_conf.network}.pt")
        self.cls_network = (
            classification_network(self.cls_conf.network, len(self.cls_conf.classes), features=self.cls_conf.features)
            if "classification" in self.tasks
            else None
        )
        self.interactive = InteractiveGate()  # interactive /infer requests in flight; a running batch yields to them
        self.cpu_load = CpuLoad()  # cores other processes keep busy: an inference leaves them (torch_threads)
        self.cpu_load.start()
        self.al = ActiveLearning(  # strategies, leases and background scoring (labelloop_app.activelearning)
            ActiveLearningConf.from_conf(conf),
            self.tasks,
            self.seg_conf,
            self.seg_model_path,
            infers=lambda: self._infers,
            datastore=lambda: self._datastore,
            wait=self._wait_for_inference,
        )

        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="LabelLoop",
            description="Annotate, retrain and infer CT/MR segmentation with active learning",
            version=labelloop_app.__version__,
            labels=dict(self.seg_conf.labels),
        )
        install_form_json_checks()
        install_routes(lambda: self._trainers, lambda: self._infers, self.datastore)
        if isinstance(self._batch_infer, LabelLoopBatchInfer):
            install_router(build_batch_router(self._batch_infer))
        install_router(build_al_router(self.al))
        if "classification" in self.tasks:
            install_router(build_classes_router(self.cls_conf.classes, self.datastore))

    def _wait_for_inference(self, cancel: threading.Event) -> float:
        """Background scoring's pause before each network call: while interactive requests or a batch run."""
        waited = self.interactive.wait_idle(cancel)
        if isinstance(getattr(self, "_batch_infer", None), LabelLoopBatchInfer):
            waited += self._batch_infer.wait_idle(cancel)
        return waited

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return LabelLoopDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            label_check=SegmentationLabelCheck(self.seg_conf.labels),
            class_check=ClassLabelCheck(self.cls_conf.classes) if "classification" in self.tasks else None,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        if "segmentation" in self.tasks:
            infers["segmentation"] = SegmentationInfer(self.seg_conf, self.seg_model_path, self.seg_network)
        if "classification" in self.tasks:
            infer = DetectorInfer if self.cls_conf.network == "detector" else ClassificationInfer
            infers["classification"] = infer(self.cls_conf, self.cls_model_path, self.cls_network)
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
        if "classification" in self.tasks:
            train = DetectorTrain if self.cls_conf.network == "detector" else ClassificationTrain
            trainers["classification"] = train(
                self.cls_conf,
                model_dir=os.path.join(self.model_dir, "classification"),
                network=self.cls_network,
                publish_path=self.cls_model_path,
            )
        return trainers

    def init_batch_infer(self) -> LabelLoopBatchInfer:
        """In-process batch inference with read-ahead; interactive requests pause it (see labelloop_app.batch)."""
        return LabelLoopBatchInfer(lambda: self._infers, self.datastore, self.interactive)

    def init_strategies(self) -> Dict[str, Strategy]:
        return self.al.strategies()

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return self.al.scoring_methods()

    def async_scoring(self, method, params=None):
        """In the server: queue scoring in its background thread (MONAI Label calls this after each strategy
        request and at start-up). Elsewhere (the training subprocess, when training ends): MONAI Label's own,
        which asks the server over HTTP. ``--conf auto_scoring false`` turns all of it off (scoring on request
        only)."""
        if not self.al.conf.auto_scoring:
            return {}
        if not self._server_mode:
            return super().async_scoring(method, params)
        return self.al.submit(method, params, automatic=True)

    def on_save_label(self, image_id, label_id):
        """A submitted label (``final`` for segmentation, ``class`` for classification) ends the image's lease."""
        res = super().on_save_label(image_id, label_id)
        self.al.on_label_saved(image_id, self.datastore())
        return res

    def infer(self, request, datastore=None):
        require("model", request.get("model", ""), self._infers)
        request = checked(f"infer with {request['model']!r}", request, INFER_RULES)
        image = request.get("image")
        if isinstance(image, str) and not (datastore or self.datastore()).get_image_uri(image):
            if not _is_uploaded_file(image):
                check_name("image id", image)
                raise NotFound(f"image {image!r} is not in the datastore")
        with self.interactive.request():
            # the task sets the count on the thread that runs it (VersionedInferTask)
            threads = threads_beside(self.interactive.active - 1 + trainings_running(), self.cpu_load.busy_cores)
            result = super().infer({**request, CPU_THREADS: threads}, datastore)
        if isinstance(result.get("params"), dict):
            result["params"][CPU_THREADS] = threads
        return result

    def next_sample(self, request):
        require("strategy", request.get("strategy", ""), self._strategies)
        request = checked(f"ask {request['strategy']!r}", request, STRATEGY_RULES)
        return super().next_sample(request)
