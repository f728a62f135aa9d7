"""``--conf`` settings of active learning: leases, and how much work a scoring run may do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, NamedTuple, Tuple

from labelloop_app.conf import ConfError, parse_bool


class Features(NamedTuple):
    """A space ``diversity`` and ``hybrid`` measure distances in: the scores' record keys whose vectors it joins,
    and its name in words."""

    keys: Tuple[str, ...]
    words: str


FEATURES = {
    "bottleneck": Features(("embedding",), "the network's bottleneck-embedding space"),
    "appearance": Features(("appearance",), "how its structures look"),
    "layout": Features(("layout",), "where its structures lie"),
    "appearance_layout": Features(("appearance", "layout"), "how its structures look and where they lie"),
}
"""``--conf diversity_features`` -> its space."""
FEATURE_KEYS = tuple(dict.fromkeys(k for f in FEATURES.values() for k in f.keys))
"""The record keys of the feature vectors the scorer stores."""


def _number(conf: Mapping[str, str], key: str, default: float, kind: type, low: float) -> float:
    raw = conf.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = kind(float(raw)) if kind is int else kind(raw)
    except (TypeError, ValueError) as e:
        raise ConfError(f"--conf {key} needs a number, got {raw!r}") from e
    if value < low:
        raise ConfError(f"--conf {key} must be at least {low}, got {raw!r}")
    return value


def _space(conf: Mapping[str, str], key: str, default: str) -> str:
    value = str(conf.get(key, default)).strip().lower()
    if value not in FEATURES:
        raise ConfError(f"--conf {key} must be one of {', '.join(FEATURES)}, got {value!r}")
    return value


@dataclass
class ActiveLearningConf:
    """How images are handed out and scored.

    ``lease_seconds``: how long an image handed to one annotator is kept from the others (a final label releases
    it sooner). ``scoring_max_images``: the most images one scoring run processes, so that a run after training
    ends in bounded time (the next run continues where it stopped). ``scoring_spacing_factor``: scoring
    resamples to the inference spacing times this factor (2: 8x fewer voxels). ``mc_samples``: stochastic
    MC-dropout passes per image. ``hybrid_pool``: the fraction of most uncertain images among which ``hybrid``
    picks the most different one. ``scoring_threads``: torch CPU threads of the scoring thread (inference keeps
    its own). ``auto_scoring``: score in the background after each training run and when a strategy is asked.
    ``diversity_features``: what ``diversity`` and ``hybrid`` measure distances in: ``bottleneck`` (the network's
    deepest features, averaged over space), ``appearance`` (how each segmented structure looks: its intensity
    under the model's prediction, and its size), ``layout`` (where each segmented structure lies in the body, and
    its size) or ``appearance_layout`` (both joined; on a cohort with organs out of place it finds fewer of
    those scans than ``layout`` alone: see the benchmarks). ``rarity_features`` and ``rarity_neighbours``: the
    space ``rarity`` measures in (one of the same four, ``layout`` by default) and which nearest unlabeled image
    its distance is taken to.
    """

    lease_seconds: float = 1800.0
    scoring_max_images: int = 50
    scoring_spacing_factor: float = 2.0
    mc_samples: int = 8
    hybrid_pool: float = 0.5
    scoring_threads: int = 1
    auto_scoring: bool = True
    diversity_features: str = "bottleneck"
    rarity_features: str = "layout"
    rarity_neighbours: int = 10

    @classmethod
    def from_conf(cls, conf: Mapping[str, str]) -> ActiveLearningConf:
        pool = _number(conf, "hybrid_pool", cls.hybrid_pool, float, 0.0)
        if not 0.0 < pool <= 1.0:
            raise ConfError(f"--conf hybrid_pool must be in (0, 1], got {conf.get('hybrid_pool')!r}")
        features = _space(conf, "diversity_features", cls.diversity_features)
        rarity = _space(conf, "rarity_features", cls.rarity_features)
        return cls(
            lease_seconds=_number(conf, "lease_seconds", cls.lease_seconds, float, 1.0),
            scoring_max_images=_number(conf, "scoring_max_images", cls.scoring_max_images, int, 1),
            scoring_spacing_factor=_number(conf, "scoring_spacing_factor", cls.scoring_spacing_factor, float, 1.0),
            mc_samples=_number(conf, "mc_samples", cls.mc_samples, int, 2),
            hybrid_pool=pool,
            scoring_threads=_number(conf, "scoring_threads", cls.scoring_threads, int, 1),
            auto_scoring=parse_bool(conf.get("auto_scoring"), cls.auto_scoring),
            diversity_features=features,
            rarity_features=rarity,
            rarity_neighbours=_number(conf, "rarity_neighbours", cls.rarity_neighbours, int, 1),
        )
