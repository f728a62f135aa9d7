"""Active-learning strategies: which unlabeled image an annotator should label next.

Every strategy sees the same :class:`Pool` (unlabeled images nobody holds, the labeled ones, the current leases and
the stored per-image scores), returns an ordering of the available images, and leases the first one to the
caller under the lease lock. Uncertainty strategies fall back to random order, and say so, while there is no
trained model or no scores yet.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from labelloop_app.activelearning.config import FEATURES
from labelloop_app.activelearning.leases import Lease, LeaseBook, anonymous_client


@dataclass
class Pool:
    """What a strategy chooses from, for one task."""

    available: List[str]
    labeled: List[str]
    leased: Dict[str, Lease]
    records: Dict[str, Dict[str, Any]]
    model_version: str

    @property
    def unlabeled(self) -> int:
        return len(self.available) + len(self.leased)


@dataclass
class Pick:
    """One image in a strategy's order, with the score that put it there."""

    image_id: str
    score: Optional[float] = None
    score_name: Optional[str] = None
    model_version: Optional[str] = None
    details: Dict[str, Any] = field(default_factory=dict)


Order = Tuple[List[Pick], Optional[str]]
"""Picks best first, and the reason for falling back to random order (None when the strategy's own order)."""


def random_order(pool: Pool, rng: Optional[random.Random] = None) -> List[Pick]:
    ids = list(pool.available)
    (rng or random).shuffle(ids)
    return [Pick(i) for i in ids]


def no_scores_reason(pool: Pool, task: str, what: str) -> str:
    if not pool.model_version:
        return "no trained model yet"
    return (
        f"no {what} yet for model {pool.model_version}: scoring runs in the background after training "
        f"(POST /scoring/{task} starts it)"
    )


def score_order(pool: Pool, key: str, task: str, rng: Optional[random.Random] = None) -> Order:
    """Highest ``key`` first; images without that score (new images, scoring still running) follow at random."""
    if not pool.model_version:
        return random_order(pool, rng), no_scores_reason(pool, task, f"{key} scores")
    scored = [i for i in pool.available if pool.records.get(i, {}).get(key) is not None]
    if not scored:
        return random_order(pool, rng), no_scores_reason(pool, task, f"{key} scores")
    scored.sort(key=lambda i: (-float(pool.records[i][key]), i))
    rest = [i for i in pool.available if i not in set(scored)]
    (rng or random).shuffle(rest)
    picks = [Pick(i, float(pool.records[i][key]), key, pool.records[i].get("model_version")) for i in scored]
    return picks + [Pick(i, None, key, None, {"unscored": True}) for i in rest], None


def has_features(record: Mapping[str, Any], keys: Sequence[str]) -> bool:
    """Whether an image's scoring record holds every feature vector ``keys`` (non-empty)."""
    return all(record.get(k) for k in keys)


def embedding_version(pool: Pool, keys: Sequence[str] = ("embedding",)) -> Optional[str]:
    """Model version whose feature vectors (``keys`` of the records) cover the most images (the current model wins
    ties): distances are only meaningful between features of the same network."""
    counts: Dict[str, int] = {}
    for record in pool.records.values():
        if has_features(record, keys):
            v = record.get("model_version") or ""
            counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None
    return max(counts, key=lambda v: (counts[v], v == pool.model_version))


def feature_vectors(records: Mapping[str, Mapping[str, Any]], keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """Each record's feature vectors ``keys`` joined into one; records that lack any of them are left out."""
    return {
        i: np.concatenate([np.asarray(r[k], dtype=np.float64) for k in keys])
        for i, r in records.items()
        if has_features(r, keys)
    }


def kcenter_greedy(
    candidates: Sequence[str], centers: Sequence[str], embeddings: Dict[str, np.ndarray], k: int
) -> List[Tuple[str, Optional[float]]]:
    """Core-set (k-center greedy) selection: repeatedly take the candidate farthest from every centre, then make
    it a centre, so consecutive picks are never near-duplicates. Features are standardised over candidates and
    centres. With no centre at all the first pick is the most typical candidate (closest to the mean). Returns
    (image id, distance to the nearest centre at the time it was picked)."""
    cands = list(candidates)
    if not cands or k <= 0:
        return []
    xc, nearest = _standardised_nearest(cands, centers, embeddings)
    taken = np.zeros(len(cands), dtype=bool)
    out: List[Tuple[str, Optional[float]]] = []
    for _ in range(min(k, len(cands))):
        if np.isinf(nearest[~taken]).all():
            typical = np.sqrt(((xc - xc.mean(axis=0)) ** 2).sum(-1))
            j = int(np.argmin(np.where(taken, np.inf, typical)))
            distance = None
        else:
            j = int(np.argmax(np.where(taken, -np.inf, nearest)))
            distance = round(float(nearest[j]), 4)
        out.append((cands[j], distance))
        taken[j] = True
        nearest = np.minimum(nearest, np.sqrt(((xc - xc[j]) ** 2).sum(-1)))
    return out


def _standardised_nearest(
    candidates: Sequence[str], centers: Sequence[str], embeddings: Dict[str, np.ndarray]
) -> Tuple[np.ndarray, np.ndarray]:
    """The candidates' features standardised over candidates and centres, and each candidate's distance to its
    nearest centre (infinite with no centre)."""
    x = _standardised(np.stack([embeddings[i] for i in list(candidates) + list(centers)]))
    xc, xk = x[: len(candidates)], x[len(candidates) :]
    if not len(xk):
        return xc, np.full(len(candidates), np.inf)
    return xc, np.concatenate([block.min(axis=1) for block in distance_blocks(xc, xk)])


def _standardised(x: np.ndarray) -> np.ndarray:
    """Each feature at mean 0 and standard deviation 1 over the rows (a constant feature at 0)."""
    x = x.astype(np.float64)
    return (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-8)


def distance_blocks(a: np.ndarray, b: np.ndarray, rows: int = 256):
    """Euclidean distances from the rows of ``a`` to those of ``b``, ``rows`` rows of ``a`` at a time: a pool of
    thousands of images never needs the (n, m, features) array of differences, only (rows, m) distances."""
    b_squared = (b**2).sum(axis=1)
    for start in range(0, len(a), rows):
        block = a[start : start + rows]
        squared = (block**2).sum(axis=1)[:, None] + b_squared[None, :] - 2.0 * block @ b.T
        yield np.sqrt(np.maximum(squared, 0.0))


def centre_distances(
    candidates: Sequence[str], centers: Sequence[str], embeddings: Dict[str, np.ndarray]
) -> Dict[str, float]:
    """Each candidate's distance to its nearest centre in the standardised embedding space: the quantity the first
    k-center pick maximises (for diagnostics: does the embedding set a subgroup apart?)."""
    if not candidates:
        return {}
    _, nearest = _standardised_nearest(candidates, centers, embeddings)
    return {i: float(d) for i, d in zip(candidates, nearest)}


def _embeddings(pool: Pool, keys: Sequence[str]) -> Tuple[Optional[str], Dict[str, np.ndarray]]:
    """The model version the feature vectors ``keys`` are compared under, and the joined vectors of that version."""
    version = embedding_version(pool, keys)
    same = {i: r for i, r in pool.records.items() if (r.get("model_version") or "") == version}
    return version, feature_vectors(same, keys)


def diversity_order(
    pool: Pool, k: int, task: str, rng: Optional[random.Random] = None, keys: Sequence[str] = ("embedding",)
) -> Order:
    """k-center greedy in the space of the feature vectors ``keys`` joined; labeled and leased images are the
    centres."""
    version, emb = _embeddings(pool, keys)
    cands = [i for i in pool.available if i in emb]
    if not pool.model_version or not cands:
        return random_order(pool, rng), no_scores_reason(pool, task, "embeddings")
    centers = [i for i in list(pool.labeled) + list(pool.leased) if i in emb]
    chosen = kcenter_greedy(cands, centers, emb, k)
    picks = [Pick(i, d, "kcenter_distance", version, {"centres": len(centers)}) for i, d in chosen]
    return picks + _rest(pool, [p.image_id for p in picks], rng), None


def knn_rarity(candidates: Sequence[str], embeddings: Dict[str, np.ndarray], neighbours: int) -> Dict[str, float]:
    """Each candidate's distance to its ``neighbours``-th nearest other candidate in the standardised feature space: a
    k-nearest-neighbour outlier score. A kind of scan that is rare in the pool sits far from most of the pool, so
    its k-th neighbour lies in another kind (with fewer candidates than that, the farthest one counts)."""
    cands = list(candidates)
    if len(cands) < 2:
        return {i: 0.0 for i in cands}
    x = _standardised(np.stack([embeddings[i] for i in cands]))
    column = min(max(int(neighbours), 1), len(cands) - 1)  # the nearest, at 0, is each candidate itself
    kth = np.concatenate([np.partition(block, column, axis=1)[:, column] for block in distance_blocks(x, x)])
    return {i: float(d) for i, d in zip(cands, kth)}


def rarity_order(
    pool: Pool,
    k: int,
    task: str,
    rng: Optional[random.Random],
    keys: Sequence[str],
    neighbours: int,
) -> Order:
    """Rarest first: the available images by their k-nearest-neighbour distance among the unlabeled images
    (:func:`knn_rarity`) in the space of the feature vectors ``keys``. Labeled images are left out of the
    neighbours on purpose: a rare kind stays rare until most of it is labeled, where core-set diversity counts it
    covered after one label. Leased images still count as neighbours, so two annotators are handed different ones."""
    version, emb = _embeddings(pool, keys)
    unlabeled = [i for i in list(pool.available) + list(pool.leased) if i in emb]
    if not pool.model_version or not any(i in emb for i in pool.available):
        return random_order(pool, rng), no_scores_reason(pool, task, "feature vectors")
    rarity = knn_rarity(unlabeled, emb, neighbours)
    ranked = sorted((i for i in pool.available if i in rarity), key=lambda i: (-rarity[i], i))
    picks = [Pick(i, round(rarity[i], 4), "knn_rarity", version, {"neighbours": neighbours}) for i in ranked]
    return picks + _rest(pool, ranked, rng), None


def hybrid_order(
    pool: Pool,
    k: int,
    task: str,
    fraction: float,
    rng: Optional[random.Random] = None,
    keys: Sequence[str] = ("embedding",),
) -> Order:
    """Uncertainty x diversity: the ``fraction`` most uncertain images (MC-dropout entropy) form the pool, and
    k-center greedy picks among them the one least like anything labeled or leased. The uncertainty filter finds
    the hard cases; the k-center step keeps a batch from being several copies of the same hard case."""
    version, emb = _embeddings(pool, keys)
    scored = [i for i in pool.available if pool.records.get(i, {}).get("entropy") is not None and i in emb]
    if not pool.model_version or not scored:
        return random_order(pool, rng), no_scores_reason(pool, task, "entropy scores and embeddings")
    scored.sort(key=lambda i: (-float(pool.records[i]["entropy"]), i))
    size = min(len(scored), max(2, math.ceil(fraction * len(scored))))
    top = scored[:size]
    centers = [i for i in list(pool.labeled) + list(pool.leased) if i in emb]
    chosen = kcenter_greedy(top, centers, emb, k)
    picks = [
        Pick(
            i,
            d,
            "kcenter_distance",
            version,
            {"entropy": float(pool.records[i]["entropy"]), "uncertain_pool": size, "centres": len(centers)},
        )
        for i, d in chosen
    ]
    picked = {p.image_id for p in picks}
    picks += [
        Pick(i, float(pool.records[i]["entropy"]), "entropy", version) for i in scored if i not in picked
    ]  # beyond the pool: most uncertain first
    return picks + _rest(pool, [p.image_id for p in picks], rng), None


def _rest(pool: Pool, taken: Sequence[str], rng: Optional[random.Random]) -> List[Pick]:
    rest = [i for i in pool.available if i not in set(taken)]
    (rng or random).shuffle(rest)
    return [Pick(i, None, None, None, {"unscored": True}) for i in rest]


def handed_out(pool: Pool, lease: Lease) -> Dict[str, Any]:
    """What every answer that hands out an image says: the image, who holds it for how long, the model now served,
    and how many unlabeled images there are and are still available (``pool`` is from before the lease)."""
    return {
        "id": lease.image_id,
        "current_model_version": pool.model_version or None,
        "client_id": lease.client_id,
        "lease": lease.state(),
        "unlabeled": pool.unlabeled,
        "available": len(pool.available) - (lease.image_id in pool.available),
    }


class LeasingStrategy(Strategy):
    """A MONAI Label strategy that hands out the first image of :meth:`order` and leases it to the caller.

    ``pool`` builds the :class:`Pool` of a task from the datastore and the active leases. Request options:
    ``client_id`` (who holds the lease; a client holds one image at a time, asking again gives the previous one
    back). The response carries the score that ranked the image, the model version it was scored with, the lease,
    and ``fallback``/``reason`` when the strategy could not use its own order.
    """

    task = "segmentation"

    def __init__(
        self,
        name: str,
        description: str,
        leases: LeaseBook,
        pool: Callable[[Datastore, str, Dict[str, Lease]], Pool],
        rng: Optional[random.Random] = None,
    ):
        super().__init__(description)
        self.name = name
        self.leases = leases
        self.pool = pool
        self.rng = rng or random.Random()

    def info(self) -> Dict[str, Any]:
        return {"description": self.description, "task": self.task}

    def order(self, pool: Pool, k: int) -> Order:
        raise NotImplementedError

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        client = str(request.get("client_id") or "") or anonymous_client()
        with self.leases.lock:
            pool = self.pool(datastore, self.task, self.leases.active())
            picks, reason = self.order(pool, 1)
            if not picks:
                return None
            pick = picks[0]
            lease = self.leases.take(pick.image_id, client, self.name)
        result: Dict[str, Any] = {
            **handed_out(pool, lease),
            "score": pick.score,
            "score_name": pick.score_name,
            "model_version": pick.model_version,
        }
        if reason:
            result.update({"fallback": "random", "reason": reason})
        result.update(pick.details)
        return result


class RandomStrategy(LeasingStrategy):
    def __init__(self, *args, **kwargs):
        super().__init__("random", "Random unlabeled image", *args, **kwargs)

    def order(self, pool: Pool, k: int) -> Order:
        return random_order(pool, self.rng), None


class FirstStrategy(LeasingStrategy):
    def __init__(self, *args, **kwargs):
        super().__init__("first", "First unlabeled image by id", *args, **kwargs)

    def order(self, pool: Pool, k: int) -> Order:
        return [Pick(i) for i in sorted(pool.available)], None


class ScoreStrategy(LeasingStrategy):
    """Highest stored score ``key`` of ``task`` first."""

    def __init__(self, name: str, description: str, key: str, task: str, *args, **kwargs):
        super().__init__(name, description, *args, **kwargs)
        self.key = key
        self.task = task

    def order(self, pool: Pool, k: int) -> Order:
        return score_order(pool, self.key, self.task, self.rng)


class DiversityStrategy(LeasingStrategy):
    def __init__(self, *args, features: str = "bottleneck", **kwargs):
        super().__init__(
            "diversity",
            f"Core-set: the image farthest, in {FEATURES[features].words}, from every labeled or leased image",
            *args,
            **kwargs,
        )
        self.keys = FEATURES[features].keys

    def order(self, pool: Pool, k: int) -> Order:
        return diversity_order(pool, k, self.task, self.rng, self.keys)


class RarityStrategy(LeasingStrategy):
    def __init__(self, *args, features: str, neighbours: int, **kwargs):
        super().__init__(
            "rarity",
            f"Rarest first: the image farthest, in {FEATURES[features].words}, from its k-th nearest unlabeled "
            f"image (k = {neighbours}), so a rare kind of scan is handed out until most of it is labeled",
            *args,
            **kwargs,
        )
        self.keys = FEATURES[features].keys
        self.neighbours = neighbours

    def order(self, pool: Pool, k: int) -> Order:
        return rarity_order(pool, k, self.task, self.rng, self.keys, self.neighbours)


class HybridStrategy(LeasingStrategy):
    def __init__(self, *args, fraction: float = 0.5, features: str = "bottleneck", **kwargs):
        super().__init__(
            "hybrid",
            f"Among the {fraction:.0%} most uncertain images (MC-dropout entropy), the one farthest, in "
            f"{FEATURES[features].words}, from every labeled or leased image (core-set)",
            *args,
            **kwargs,
        )
        self.fraction = fraction
        self.keys = FEATURES[features].keys

    def order(self, pool: Pool, k: int) -> Order:
        return hybrid_order(pool, k, self.task, self.fraction, self.rng, self.keys)
