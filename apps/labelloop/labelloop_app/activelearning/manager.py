"""Ties active learning together for the app: strategies, leases, scoring methods, background scoring, queue."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from labelloop_app.activelearning.background import BackgroundScoring
from labelloop_app.activelearning.classification import FINDING, ClassificationScoring
from labelloop_app.activelearning.config import FEATURE_KEYS, ActiveLearningConf
from labelloop_app.activelearning.leases import Lease, LeaseBook
from labelloop_app.activelearning.records import read_records
from labelloop_app.activelearning.segmentation import SegmentationScorer, SegmentationScoring
from labelloop_app.activelearning.strategies import (
    DiversityStrategy,
    FirstStrategy,
    HybridStrategy,
    LeasingStrategy,
    Pool,
    RandomStrategy,
    RarityStrategy,
    ScoreStrategy,
    handed_out,
)
from labelloop_app.class_labels import CLASS_TAG
from labelloop_app.conf import SegmentationConf
from labelloop_app.errors import Conflict, NotFound
from labelloop_app.model_file import ModelFile
from labelloop_app.uncertainty import MEASURES

logger = logging.getLogger(__name__)

Wait = Callable[[threading.Event], Any]

LABEL_TAGS = {"segmentation": DefaultLabelTag.FINAL.value, "classification": CLASS_TAG}
"""The label that makes an image labeled for each task: strategies hand out only images without it."""


def unlabeled_images(datastore: Datastore, task: str) -> List[str]:
    tag = LABEL_TAGS.get(task, DefaultLabelTag.FINAL.value)
    if tag == DefaultLabelTag.FINAL.value:
        return datastore.get_unlabeled_images()
    return [i for i in datastore.list_images() if not datastore.get_label_by_image_id(i, tag)]


def readable_scores(record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """An image's stored scores without its feature vectors (long, and meaningless to read)."""
    return {key: v for key, v in (record or {}).items() if key not in FEATURE_KEYS}


def _training_running() -> bool:
    from monailabel.utils.async_tasks.utils import processes

    return len(processes("train")) > 0


class ActiveLearning:
    """Everything the strategies and the scoring share, created once per app.

    ``infers`` and ``datastore`` are callables because MONAI Label builds them after the strategies are asked for.
    ``wait(cancel)`` blocks while interactive or batch inference runs; scoring calls it before every network call.
    """

    def __init__(
        self,
        conf: ActiveLearningConf,
        tasks: Sequence[str],
        seg_conf: Optional[SegmentationConf],
        seg_model_path: Optional[str],
        infers: Callable[[], Dict[str, InferTask]],
        datastore: Callable[[], Datastore],
        wait: Optional[Wait] = None,
    ):
        self.conf = conf
        self.tasks = list(tasks)
        self.seg_conf = seg_conf
        self.infers = infers
        self.datastore = datastore
        self.wait = wait
        self.leases = LeaseBook(conf.lease_seconds)
        self._model_files: Dict[str, ModelFile] = {}
        if seg_model_path:
            self._model_files["segmentation"] = ModelFile(seg_model_path)
        self._strategies: Dict[str, LeasingStrategy] = {}
        self._methods: Dict[str, ScoringMethod] = {}
        self.background = BackgroundScoring(lambda: self._methods, datastore, conf.scoring_threads, _training_running)

    # --- model versions ----------------------------------------------------------------------------------------
    def model_version(self, task: str) -> str:
        """Version of the model a task serves ("" while it has none)."""
        model_file = self._model_files.get(task)
        if model_file is None:
            infer = self.infers().get(task)
            own = getattr(infer, "model_file", None)
            if own is not None and hasattr(own, "version"):
                return own.version()
            paths = [p for p in (getattr(infer, "path", None) or []) if p]
            if not paths:
                return ""
            model_file = self._model_files.setdefault(task, ModelFile(paths[0]))
        return model_file.version() if os.path.isfile(model_file.path) else ""

    # --- MONAI Label interfaces --------------------------------------------------------------------------------
    def strategies(self) -> Dict[str, Strategy]:
        args = (self.leases, self.pool)
        first_task = self.tasks[0] if self.tasks else "segmentation"
        s: Dict[str, LeasingStrategy] = {"random": RandomStrategy(*args), "first": FirstStrategy(*args)}
        s["random"].task = s["first"].task = first_task
        if "segmentation" in self.tasks:
            s["entropy"] = ScoreStrategy(
                "entropy",
                "MC-dropout predictive entropy: the image the segmentation model is least sure about",
                "entropy",
                "segmentation",
                *args,
            )
            s["bald"] = ScoreStrategy(
                "bald",
                "BALD (MC-dropout mutual information): the image on which the dropout passes disagree most, the "
                "model's own doubt without the noise in the image that entropy also counts",
                "mutual_information",
                "segmentation",
                *args,
            )
            s["tta"] = ScoreStrategy(
                "tta",
                "Test-time augmentation: the image whose segmentation changes most under flips and intensity changes",
                "tta",
                "segmentation",
                *args,
            )
            features = self.conf.diversity_features
            s["diversity"] = DiversityStrategy(*args, features=features)
            s["hybrid"] = HybridStrategy(*args, fraction=self.conf.hybrid_pool, features=features)
            s["rarity"] = RarityStrategy(
                *args, features=self.conf.rarity_features, neighbours=self.conf.rarity_neighbours
            )
        if "classification" in self.tasks:
            for key in MEASURES:
                s[f"cls_{key}"] = ScoreStrategy(
                    f"cls_{key}",
                    f"Classification: highest {key.replace('_', ' ')} of the class probabilities",
                    key,
                    "classification",
                    *args,
                )
            s["cls_finding"] = ScoreStrategy(
                "cls_finding",
                "Classification: the image most likely to show a finding (lowest probability of the first, normal "
                "class); a detector learns from findings, and a rare finding is what an annotator's time buys",
                FINDING,
                "classification",
                *args,
            )
        self._strategies = s
        return dict(s)

    def scoring_methods(self) -> Dict[str, ScoringMethod]:
        methods: Dict[str, ScoringMethod] = {}
        if "segmentation" in self.tasks and self.seg_conf is not None:
            stop = threading.Event()
            scorer = SegmentationScorer(
                self.seg_conf, mc_samples=self.conf.mc_samples, spacing_factor=self.conf.scoring_spacing_factor
            )
            methods["segmentation"] = SegmentationScoring(
                scorer,
                self._model_files["segmentation"].path,
                lambda: self.model_version("segmentation"),
                self.conf.scoring_max_images,
                wait=self._waiter(stop),
                stop=stop,
            )
        if "classification" in self.tasks:
            stop = threading.Event()
            methods["classification"] = ClassificationScoring(
                lambda: self.infers().get("classification"),
                lambda: self.model_version("classification"),
                lambda ds: unlabeled_images(ds, "classification"),
                self.conf.scoring_max_images,
                wait=self._waiter(stop),
                stop=stop,
            )
        self._methods = methods
        return dict(methods)

    def _waiter(self, stop: threading.Event) -> Optional[Callable[[], Any]]:
        if self.wait is None:
            return None
        wait = self.wait
        return lambda: wait(stop)

    # --- scoring -----------------------------------------------------------------------------------------------
    def submit(self, method: Optional[str] = None, params: Optional[Dict] = None, automatic: bool = False) -> Dict:
        """Queue scoring for one method or all; ``automatic`` requests are skipped while training runs."""
        names = [method] if method else list(self._methods)
        return {m: self.background.submit(m, (params or {}).get(m) if not method else params, automatic) for m in names}

    # --- strategies' view --------------------------------------------------------------------------------------
    def pool(self, datastore: Datastore, task: str, leases: Dict[str, Lease]) -> Pool:
        unlabeled = set(unlabeled_images(datastore, task))
        return Pool(
            available=sorted(i for i in unlabeled if i not in leases),
            labeled=sorted(i for i in datastore.list_images() if i not in unlabeled),
            leased={i: lease for i, lease in leases.items() if i in unlabeled},
            records=read_records(datastore, task),
            model_version=self.model_version(task),
        )

    def on_label_saved(self, image_id: str, datastore: Datastore) -> Optional[Lease]:
        """A submitted label ends the image's lease when it is the label of the task the lease was for."""
        lease = self.leases.active().get(image_id)
        if lease is None:
            return None
        strategy = self._strategies.get(lease.strategy)
        task = strategy.task if strategy is not None else "segmentation"
        if datastore.get_label_by_image_id(image_id, LABEL_TAGS.get(task, DefaultLabelTag.FINAL.value)):
            return self.leases.release(image_id)
        return None

    def take(self, strategy: str, image_id: str, client_id: str) -> Dict[str, Any]:
        """Lease an image the annotator chose (from the queue, say) to ``client_id``, as ``strategy`` would have.

        Raises :class:`NotFound` for an image the datastore does not hold and :class:`Conflict` for one already
        labeled for the strategy's task or held by another client; the client's previous lease ends, as when it asks
        a strategy for its next image."""
        s = self._strategies[strategy]
        with self.leases.lock:
            pool = self.pool(self.datastore(), s.task, self.leases.active())
            if image_id in pool.labeled:
                raise Conflict(f"image {image_id!r} is already labeled for {s.task}")
            held = pool.leased.get(image_id)
            if held is None and image_id not in pool.available:
                raise NotFound(f"unknown image {image_id!r}")
            if held is not None and held.client_id != client_id:
                raise Conflict(
                    f"image {image_id!r} is leased to {held.client_id!r} for another "
                    f"{held.state(self.leases.clock())['expires_in']:.0f} s"
                )
            lease = self.leases.take(image_id, client_id, strategy)
        record = readable_scores(pool.records.get(image_id))
        return {
            **handed_out(pool, lease),
            "chosen": True,
            "model_version": record.get("model_version"),
            "scores": record,
        }

    def queue(self, strategy: str, k: int) -> Dict[str, Any]:
        """The next ``k`` images ``strategy`` would hand out (nothing is leased), and the images leased now."""
        s = self._strategies[strategy]
        datastore = self.datastore()
        with self.leases.lock:
            leases = self.leases.active()
            pool = self.pool(datastore, s.task, leases)
        picks, reason = s.order(pool, k)

        def scores(image_id: str) -> Dict[str, Any]:
            return readable_scores(pool.records.get(image_id))

        items: List[Dict[str, Any]] = []
        for rank, pick in enumerate(picks[:k], start=1):
            items.append(
                {
                    "rank": rank,
                    "id": pick.image_id,
                    "score": pick.score,
                    "score_name": pick.score_name,
                    "model_version": pick.model_version or scores(pick.image_id).get("model_version"),
                    "scores": scores(pick.image_id),
                    "lease": None,
                    **pick.details,
                }
            )
        leased = [
            {"id": i, "lease": lease.state(), "scores": scores(i)}
            for i, lease in sorted(pool.leased.items(), key=lambda kv: kv[1].since)
        ]
        out: Dict[str, Any] = {
            "strategy": strategy,
            "task": s.task,
            "k": k,
            "current_model_version": pool.model_version or None,
            "unlabeled": pool.unlabeled,
            "available": len(pool.available),
            "lease_seconds": self.leases.seconds,
            "items": items,
            "leased": leased,
            "scoring": self.background.status(),
        }
        if reason:
            out.update({"fallback": "random", "reason": reason})
        return out
