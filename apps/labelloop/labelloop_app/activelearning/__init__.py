"""Active learning for LabelLoop: which image to annotate next, and the per-image scores behind the choice.

Strategies (``POST /activelearning/{strategy}``): ``random``, ``first``, ``entropy`` (MC-dropout), ``bald``
(MC-dropout mutual information), ``tta`` (test-time augmentation), ``diversity`` (core-set in the bottleneck
embedding), ``hybrid`` (uncertain, then diverse) and, with the classification task, ``cls_entropy``, ``cls_margin``,
``cls_least_confidence`` and ``cls_finding`` (the image most likely to show a finding). Every strategy leases what
it hands out. Scores live in each image's info and are computed in a background thread of the server after
training, on request (``POST /scoring/{task}``) and when a strategy is asked.
"""

from labelloop_app.activelearning.config import ActiveLearningConf
from labelloop_app.activelearning.manager import ActiveLearning
from labelloop_app.activelearning.records import SCORES_KEY, read_records, store_record
from labelloop_app.activelearning.routes import build_router
from labelloop_app.activelearning.segmentation import SegmentationScorer, SegmentationScoring

__all__ = [
    "SCORES_KEY",
    "ActiveLearning",
    "ActiveLearningConf",
    "SegmentationScorer",
    "SegmentationScoring",
    "build_router",
    "read_records",
    "store_record",
]
