"""Simulated annotation study: how many labels each active-learning strategy needs, against random.

    python benchmarks/active_learning.py --strategies random,entropy,hybrid --pool 40 --rare native \
        --rare-every 10 --heldout-rare-every 2 --max-labels 16 --warmup-steps 1200 --steps 400
                                                  # seeds 0-2 of the recorded study (about 36 min, 2 idle cores)
    python benchmarks/active_learning.py --seeds 1 --strategies random,entropy --max-labels 8   # a quick look

The recorded study adds seeds 3 and 4 to that with ``--seeds 5 --resume benchmarks/results/active_learning.json``
(about 31 min more): ``--resume`` keeps a recorded study's seeds and runs only the missing ones (every other setting
must match). Training repeats exactly on one machine, not across machines, so a resumed study first retrains a
recorded warm start and stops unless it gives the recorded round 0 (``--other-machine`` goes on and says so in the
report); the check is recorded under ``reproduction``.

The cohort is the sample data's: ``cohort_plan("seg", 24)`` of ``labelloop_app.synthetic`` (the same seeds,
orientations, field-of-view cuts and hard cases as ``sample-data/segmentation``) as the pool, and
``cohort_plan("seg_heldout", 16)`` (the sample data's 8 held-out cases and the next 8) for evaluation, rendered
small (``small=True``, 48-64 voxels per side) so that the whole study fits on a laptop CPU.

``--rare`` names a subgroup and ``--rare-every`` / ``--heldout-rare-every`` how often a case belongs to it: ``hard``
(small organs, little fat, 18-25 HU noise; every 4th case by default, as in the sample data), ``native`` (native
phase among contrast-enhanced scans, no hard cases: a protocol a model has rarely seen) or ``mirrored`` (situs
inversus, liver and spleen on the other side, no hard cases: anatomy a model cannot extrapolate to). A pool where
the subgroup is rare (``--rare-every 10``) and a held-out set where it is half (``--heldout-rare-every 2``) asks the
question active learning is for: does it find the few cases unlike the rest, and does labelling them pay?

An oracle plays the annotators. Each seed starts from ``--initial`` random labeled cases and a model trained on
them (``--warmup-steps``). Every round: fine-tune for a fixed ``--steps`` (the SegmentationTrain task's
transforms, loss, optimizer and network, in-process), measure held-out Dice, score the pool with the server's
``SegmentationScorer`` (MC dropout, TTA, bottleneck embedding at twice the training spacing), let the server's
strategy classes hand out ``--batch`` images (leases included), reveal their ground truth, repeat up to
``--max-labels``. The reference is the same warm start fine-tuned on every pool case for the same total steps.

Writes ``benchmarks/results/active_learning.{json,md,png}``: the learning curves (mean and spread over seeds)
and the labels each strategy needs to reach 95% of the all-labels Dice, relative to random, with a 95% interval
from resampling the seeds. When random never reaches that within ``--max-labels`` (a pool much larger than the
budget), the labels each strategy needs to reach random's final Dice say what it saves instead.

``dice`` ranks by the scorer's structure-wise expected Dice loss; it is measured here but not offered by the
server, as it needed more labels than random. Two reference strategies see the pool's ground truth and are not
offered by the server either: ``oracle_error`` labels the cases the current model segments worst (the most that any
estimate of the model's error could save) and ``oracle_rare`` the rare subgroup first (the most that finding the
subgroup could save). ``diversity_appearance`` and ``diversity_layout`` are ``diversity`` with the server's
``--conf diversity_features appearance`` or ``layout``, so that one study compares the feature spaces.
``rarity`` is the server's ``rarity`` strategy with its defaults (the layout features, the 10th nearest unlabeled
image); ``rarity_appearance``, ``rarity_appearance_layout`` and ``rarity_bottleneck`` are ``rarity`` with the server's
``--conf rarity_features`` set to that space.

``--beyond N --resume <study>.json`` measures what a study's budget cuts off: random runs again in every recorded
seed (its recorded rounds must repeat exactly) and on up to N labels, with the study's target; the report then gives
random's labels to the target per seed and by the mean curve past the budget, and each strategy's relative to that.

``--render benchmarks/results/<name>.json`` runs nothing: it re-writes a recorded study's summary, report and plot
from its JSON, with the written notes kept in the JSON's ``notes``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from classification import pair_auc
from common import command, machine
from monai.data import CacheDataset
from monai.inferers import SlidingWindowInferer
from monai.transforms import Compose

from labelloop_app.activelearning.config import FEATURES, ActiveLearningConf
from labelloop_app.activelearning.leases import LeaseBook
from labelloop_app.activelearning.segmentation import SegmentationScorer, window_size
from labelloop_app.activelearning.strategies import (
    DiversityStrategy,
    HybridStrategy,
    Pool,
    RandomStrategy,
    RarityStrategy,
    ScoreStrategy,
    centre_distances,
    feature_vectors,
    knn_rarity,
)
from labelloop_app.conf import SegmentationConf
from labelloop_app.networks import segmentation_network
from labelloop_app.synthetic import SEG_LABELS, cohort_plan, phantom_case
from labelloop_app.train_segmentation import SegmentationTrain
from labelloop_app.training import PolyLR
from labelloop_app.uncertainty import fragmentation

HERE = Path(__file__).resolve().parent
SEG_STRATEGIES = ("random", "entropy", "bald", "dice", "tta", "diversity", "hybrid")
CLS_STRATEGIES = ("random", "cls_entropy", "cls_margin", "cls_least_confidence", "cls_finding")
RARITY = ActiveLearningConf()
"""``rarity`` measures in the server's default space with its default neighbour."""
ORACLES = ("oracle_error", "oracle_rare")
"""Reference strategies that see the pool's ground truth, not offered by the server: the worst-segmented cases first
(the most any score of the model's error could do), and the rare subgroup first (the most finding it could do)."""
FEATURED = {f"diversity_{f}": f for f in FEATURES if f != "bottleneck"}
"""``diversity`` in another feature space (the server's ``--conf diversity_features <f>``), so that one study can
compare the spaces."""
RARITIES = {"rarity": RARITY.rarity_features} | {f"rarity_{f}": f for f in FEATURES if f != RARITY.rarity_features}
"""``rarity`` in its default space and in each other one (the server's ``--conf rarity_features <f>``)."""
STRATEGIES = (
    *(s for s in SEG_STRATEGIES if s not in ("bald", "dice")),
    *CLS_STRATEGIES[1:],
    "bald",
    "dice",
    *ORACLES,
    *FEATURED,
    *RARITIES,
)
"""The index seeds each strategy's random stream (a strategy added later goes last, so that recorded streams stay)."""
UNCERTAIN = ("entropy", "bald", "dice", "tta", "hybrid", *CLS_STRATEGIES[1:])
"""They need full scores of the unlabeled images."""
DIVERSE = ("diversity", *FEATURED)  # core-set alone
FEATURES_ONLY = (*DIVERSE, *RARITIES)  # feature vectors are all they need
EMBEDDED = (*DIVERSE, "hybrid")  # they pick by distances in an embedding space
SCORE_KEY = {
    "entropy": "entropy",
    "bald": "mutual_information",
    "dice": "expected_dice_loss",
    "tta": "tta",
    "hybrid": "entropy",
    **{s: s[4:] for s in CLS_STRATEGIES[1:]},
    **{s: "knn_rarity" for s in RARITIES},
}
"""The score each strategy ranks by (stored, or computed from feature vectors for ``rarity``)."""


# ------------------------------------------------------------------------------------------------------------------
# cohort
# ------------------------------------------------------------------------------------------------------------------
RARE = ("hard", "native", "mirrored")
RARE_WORDS = {"hard": "hard cases", "native": "native-phase cases", "mirrored": "situs-inversus cases"}


STUDY_SPACING = 6.0
STUDY_ROI = (32, 32, 32)


# options that do not change what a study's own runs compute (``beyond`` is recorded in the study's ``beyond``)
UNRECORDED = ("out", "resume", "render", "other_machine", "beyond")


def study_conf(spacing: float = STUDY_SPACING, roi: Sequence[int] = STUDY_ROI) -> SegmentationConf:
    """The segmentation task's settings in the simulated studies and ``score_vs_error.py``: the sample data's labels
    at a coarse spacing, so that a round of 400 fine-tuning steps and scoring takes about 25 s on 2 CPU cores."""
    return SegmentationConf(
        labels=dict(SEG_LABELS),
        target_spacing=(spacing,) * 3,
        roi_size=tuple(roi),
        num_samples=2,
        sw_batch_size=2,
    )


def build_cohort(
    folder: Path, kind: str, n: int, seed: int, rare: str = "hard", rare_every: int = 4
) -> List[Dict[str, Any]]:
    """Render the sample data's cohort plan small and write image + ground truth; returns the cases.

    Every ``rare_every``-th case (0: none) belongs to the ``rare`` subgroup: ``hard`` cases (as every 4th is in the
    sample data; contrast phase from the seed), ``native``-phase cases among enhanced ones (none hard) or
    ``mirrored`` (situs inversus) cases among normal ones (none hard; contrast phase from the seed)."""
    cases = []
    for i, plan in enumerate(cohort_plan(kind, n, seed=seed)):
        is_rare = rare_every > 0 and i % rare_every == rare_every - 1
        if rare == "hard":
            plan["hard"] = is_rare
        elif rare == "native":
            plan["hard"], plan["enhanced"] = False, not is_rare
        else:
            plan["hard"], plan["mirrored"] = False, is_rare
        kw = {k: v for k, v in plan.items() if k != "id"}
        case = phantom_case(**kw, small=True)
        image, label = folder / f"{plan['id']}.nii.gz", folder / f"{plan['id']}_label.nii.gz"
        sitk.WriteImage(case.image, str(image), True)
        sitk.WriteImage(case.label, str(label), True)
        status = {name: o["status"] for name, o in case.info["organs"].items()}
        cases.append({"id": plan["id"], "image": str(image), "label": str(label), "rare": is_rare, **status})
    return cases


# ------------------------------------------------------------------------------------------------------------------
# training and evaluation with the project's SegmentationTrain pieces
# ------------------------------------------------------------------------------------------------------------------
def train_steps(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    draw: Callable[[], List[Dict[str, torch.Tensor]]],
) -> float:
    """``steps`` optimizer steps, each on the crops ``draw()`` returns, with the server's polynomial learning-rate
    decay over them (so that each round ends on a settled model); the seconds taken."""
    schedule = PolyLR(optimizer)
    network.train()
    t0 = time.time()
    for step in range(steps):
        schedule.set_progress(step / steps)
        crops = draw()
        image = torch.stack([c["image"] for c in crops])
        label = torch.stack([c["label"] for c in crops])
        optimizer.zero_grad(set_to_none=True)
        loss(network(image), label).backward()
        optimizer.step()
    return time.time() - t0


class Trainer:
    """The SegmentationTrain task's transforms, loss, optimizer and learning-rate decay in a plain loop with a fixed
    step budget (no ignite engine, no checkpoint files: the study trains hundreds of short rounds)."""

    def __init__(self, conf: SegmentationConf, pool: List[Dict], heldout: List[Dict], workdir: Path, lr: float):
        self.conf = conf
        self.lr = lr
        self.task = SegmentationTrain(
            conf, model_dir=str(workdir / "train"), network=self.new_network(), publish_path=str(workdir / "m.pt")
        )
        ctx = SimpleNamespace(request={"num_samples": conf.num_samples, "learning_rate": lr}, network=None)
        data = [{"image": c["image"], "label": c["label"]} for c in pool]
        self.index = {c["id"]: i for i, c in enumerate(pool)}
        self.train_ds = CacheDataset(data, Compose(self.task.train_pre_transforms(ctx)), progress=False)
        self.val = Compose(self.task.val_pre_transforms(ctx))
        self.heldout = [(c, self.val({"image": c["image"], "label": c["label"]})) for c in heldout]
        self.pool, self._pool_val = pool, None
        self.loss = self.task.loss_function(ctx)

    def new_network(self) -> torch.nn.Module:
        return segmentation_network(self.conf.network, self.conf.out_channels)

    def train(self, network: torch.nn.Module, labeled: Sequence[str], steps: int, rng: random.Random) -> float:
        """``steps`` optimizer steps, each on ``num_samples`` random crops of one random labeled case, with the
        server's polynomial learning-rate decay over the round."""
        optimizer = self.task.optimizer(SimpleNamespace(request={"learning_rate": self.lr}, network=network))
        return train_steps(
            network, optimizer, self.loss, steps, lambda: self.train_ds[self.index[rng.choice(list(labeled))]]
        )

    def pool_cases(self, network: torch.nn.Module, ids: Sequence[str]) -> List[Dict[str, Any]]:
        """:meth:`evaluate`'s per-case results for the pool cases ``ids`` (their ground truth is the oracles' and the
        benchmarks' to see, never a strategy's)."""
        if self._pool_val is None:
            self._pool_val = {c["id"]: (c, self.val({"image": c["image"], "label": c["label"]})) for c in self.pool}
        return self.evaluate(network, [self._pool_val[i] for i in ids])["cases"]

    def pool_dice(self, network: torch.nn.Module, ids: Sequence[str]) -> Dict[str, float]:
        """Mean Dice of the pool cases ``ids`` against their ground truth (for the oracle strategies only)."""
        return {c["id"]: c["mean"] for c in self.pool_cases(network, ids)}

    def evaluate(self, network: torch.nn.Module, cases: Optional[Sequence] = None) -> Dict[str, Any]:
        """Held-out Dice per organ at the training spacing (organs absent from a case are not counted) and the
        :func:`fragmentation` of each case's prediction; ``cases``: other (case, preprocessed data) pairs than the
        held-out ones."""
        network.eval()
        per_case = []
        with torch.inference_mode():
            for case, d in self.heldout if cases is None else cases:
                image = d["image"][None]
                inferer = SlidingWindowInferer(window_size(image.shape[2:], self.conf.roi_size), sw_batch_size=1)
                pred = inferer(image, network).argmax(1)[0].numpy()
                ref = d["label"][0].numpy().round().astype(int)
                dice = {}
                for channel, name in enumerate(self.conf.labels, start=1):
                    p, r = pred == channel, ref == channel
                    if r.any():
                        dice[name] = 2.0 * float((p & r).sum()) / float(p.sum() + r.sum())
                per_case.append(
                    {
                        "id": case["id"],
                        "rare": case["rare"],
                        "mean": float(np.mean(list(dice.values()))),
                        "fragmentation": round(fragmentation(pred, list(range(1, len(self.conf.labels) + 1))), 4),
                    }
                )
        return {
            "dice": float(np.mean([c["mean"] for c in per_case])),
            "dice_rare": float(np.mean([c["mean"] for c in per_case if c["rare"]] or [np.nan])),
            "dice_common": float(np.mean([c["mean"] for c in per_case if not c["rare"]] or [np.nan])),
            "cases": per_case,
        }


# ------------------------------------------------------------------------------------------------------------------
# one annotation run
# ------------------------------------------------------------------------------------------------------------------
def make_strategy(
    name: str, leases: LeaseBook, pool_fn, rng: random.Random, hybrid_pool: float, features: str = "bottleneck"
):
    """The server's strategy classes, fed by the study's pool instead of a datastore."""
    args = (leases, pool_fn)
    if name == "random":
        return RandomStrategy(*args, rng=rng)
    if name in ("entropy", "bald", "dice", "tta"):
        return ScoreStrategy(name, name, SCORE_KEY[name], "segmentation", *args, rng=rng)
    if name in CLS_STRATEGIES[1:]:
        return ScoreStrategy(name, name, name[len("cls_") :], "classification", *args, rng=rng)
    if name in ORACLES:
        return ScoreStrategy(name, name, name, "segmentation", *args, rng=rng)
    if name in DIVERSE:
        return DiversityStrategy(*args, features=FEATURED.get(name, features), rng=rng)
    if name == "hybrid":
        return HybridStrategy(*args, fraction=hybrid_pool, features=features, rng=rng)
    if name in RARITIES:
        return RarityStrategy(*args, features=RARITIES[name], neighbours=RARITY.rarity_neighbours, rng=rng)
    raise ValueError(name)


def run(
    strategy: str,
    seed: int,
    warm: torch.nn.Module,
    initial: List[str],
    trainer: Trainer,
    scorer: SegmentationScorer,
    images: Dict[str, torch.Tensor],
    cases: Dict[str, Dict],
    args: argparse.Namespace,
    metric: str = "dice",
) -> List[Dict[str, Any]]:
    """One strategy's annotation run from the seed's warm start: a row per round with the held-out ``metric``
    (a key of ``trainer.evaluate``'s result, as is ``<metric>_rare``) and the images picked."""
    rng = random.Random(1000 * seed + STRATEGIES.index(strategy))
    seed_training(trainer, 1000 * seed + 17)  # same training noise for every strategy of a seed
    network = copy.deepcopy(warm)
    labeled = list(initial)
    state: Dict[str, Any] = {"records": {}, "version": ""}
    leases = LeaseBook(3600.0)

    def pool_fn(datastore, task, active) -> Pool:
        unlabeled = [i for i in cases if i not in labeled]
        return Pool(
            available=[i for i in unlabeled if i not in active],
            labeled=list(labeled),
            leased={i: lease for i, lease in active.items() if i in unlabeled},
            records=state["records"],
            model_version=state["version"],
        )

    features = getattr(args, "diversity_features", "bottleneck")
    chooser = make_strategy(strategy, leases, pool_fn, rng, getattr(args, "hybrid_pool", 0.5), features)
    rounds = []
    for r in range(math.ceil((args.max_labels - args.initial) / args.batch) + 1):
        train_s = trainer.train(network, labeled, args.steps, rng) if r > 0 else 0.0
        t0 = time.time()
        ev = trainer.evaluate(network)
        eval_s = time.time() - t0
        row = {"round": r, "labels": len(labeled), **ev, "train_seconds": round(train_s, 1)}
        row["eval_seconds"] = round(eval_s, 1)
        if len(labeled) >= args.max_labels:
            rounds.append(row)
            break
        # score with the server's scorer: full scores for unlabeled images, the embedding for labeled ones
        t0 = time.time()
        state["version"] = f"seed{seed}-{strategy}-round{r}"
        state["records"] = {}
        if strategy in ORACLES:
            state["records"] = oracle_records(strategy, network, trainer, cases, labeled, rng, state["version"])
        elif strategy != "random":
            for image_id in cases:
                embedding_only = image_id in labeled or strategy in FEATURES_ONLY
                rec = scorer.score(network, images[image_id], embedding_only=embedding_only)
                state["records"][image_id] = {**rec, "model_version": state["version"]}
        row["score_seconds"] = round(time.time() - t0, 1)
        if strategy in UNCERTAIN:
            unlabeled = [i for i in cases if i not in labeled]
            row["entropy_rare_vs_common"] = _separation(state["records"], cases, unlabeled)
            key = SCORE_KEY[strategy]
            if key != "entropy":
                row[f"{key}_rare_vs_common"] = _separation(state["records"], cases, unlabeled, key)
        if strategy in EMBEDDED:
            keys = FEATURES[FEATURED.get(strategy, features)].keys
            row["centre_distance_rare_vs_common"] = _embedding_separation(state["records"], cases, labeled, keys)
        if strategy in RARITIES:
            row["knn_rarity_rare_vs_common"] = _rarity_separation(state["records"], cases, labeled, RARITIES[strategy])
        picks = []
        for j in range(min(args.batch, args.max_labels - len(labeled))):
            answer = chooser({"client_id": f"oracle{j}"}, None)
            picks.append(answer)
        for a in picks:
            leases.release(a["id"])
        labeled += [a["id"] for a in picks]
        row["picked"] = [
            {
                "id": a["id"],
                "rare": cases[a["id"]]["rare"],
                "score": a.get("score"),
                "entropy": state["records"].get(a["id"], {}).get("entropy"),
                "fallback": a.get("fallback"),
            }
            for a in picks
        ]
        rounds.append(row)
        print(
            f"  {strategy:9s} seed {seed} labels {row['labels']:2d}: {metric} {ev[metric]:.3f} "
            f"(rare {ev[metric + '_rare']:.3f}) "
            f"picked {[p['id'][-3:] + ('*' if p['rare'] else '') for p in row['picked']]}"
            f" train {train_s:.0f}s score {row['score_seconds']:.0f}s",
            flush=True,
        )
    return rounds


def oracle_records(
    strategy: str,
    network: torch.nn.Module,
    trainer: Trainer,
    cases: Dict[str, Dict],
    labeled: Sequence[str],
    rng: random.Random,
    version: str,
) -> Dict[str, Dict[str, Any]]:
    """The unlabeled cases' oracle scores: ``oracle_error`` one minus the case's Dice against its ground truth;
    ``oracle_rare`` 1 for the rare subgroup, 0 for the rest, plus a random fraction so that the order within each
    is random."""
    unlabeled = [i for i in cases if i not in labeled]
    if strategy == "oracle_error":
        score = {i: 1.0 - d for i, d in trainer.pool_dice(network, unlabeled).items()}
    else:
        score = {i: float(cases[i]["rare"]) + 0.5 * rng.random() for i in unlabeled}
    return {i: {strategy: round(v, 6), "model_version": version} for i, v in score.items()}


def _separation(
    records: Dict[str, Dict], cases: Dict[str, Dict], ids: Sequence[str], key: str = "entropy"
) -> Dict[str, Any]:
    """How well the score ``key`` tells the rare subgroup from the rest among the scored images (AUC)."""
    rare = [records[i][key] for i in ids if cases[i]["rare"] and key in records.get(i, {})]
    common = [records[i][key] for i in ids if not cases[i]["rare"] and key in records.get(i, {})]
    if not rare or not common:
        return {}
    return {
        f"auc_{key}_rare": round(pair_auc(rare, common), 3),
        "mean_rare": float(np.mean(rare)),
        "mean_common": float(np.mean(common)),
    }


def _embedding_separation(
    records: Dict[str, Dict], cases: Dict[str, Dict], labeled: Sequence[str], keys: Sequence[str] = ("embedding",)
) -> Dict[str, Any]:
    """How well the distance to the nearest labeled case in the space of the feature vectors ``keys`` (what
    k-center greedy picks by) tells the rare subgroup from the rest among the unlabeled images (AUC)."""
    emb = feature_vectors(records, keys)
    unlabeled = [i for i in cases if i not in labeled and i in emb]
    distances = centre_distances(unlabeled, [i for i in labeled if i in emb], emb)
    return _separation({i: {"centre_distance": d} for i, d in distances.items()}, cases, unlabeled, "centre_distance")


def _rarity_separation(
    records: Dict[str, Dict], cases: Dict[str, Dict], labeled: Sequence[str], features: str
) -> Dict[str, Any]:
    """How well the k-nearest-neighbour distance among the unlabeled images in the space ``features`` (what
    ``rarity`` picks by, with the server's default neighbour) tells the rare subgroup from the rest among them
    (AUC)."""
    emb = feature_vectors(records, FEATURES[features].keys)
    unlabeled = [i for i in cases if i not in labeled and i in emb]
    rarity = knn_rarity(unlabeled, emb, RARITY.rarity_neighbours)
    return _separation({i: {"knn_rarity": d} for i, d in rarity.items()}, cases, unlabeled, "knn_rarity")


def seed_training(trainer, seed: int) -> None:
    """Seed everything random in training: torch (weights, dropout) and the training transforms' own generators
    (MONAI's random crops and augmentations draw from per-transform generators, not from torch)."""
    torch.manual_seed(seed)
    trainer.train_ds.transform.set_random_state(seed=seed)


def warm_start(trainer, seed: int, first: Sequence[str], steps: int) -> torch.nn.Module:
    """The seed's warm start: a new network trained ``steps`` steps on ``first`` with the seed's training noise."""
    seed_training(trainer, seed)
    warm = trainer.new_network()
    trainer.train(warm, first, steps, random.Random(seed))
    return warm


def check_reproduction(
    seed: int, retrained: float, recorded: float, metric: str, args: argparse.Namespace, checks: List[Dict]
) -> None:
    """Append to ``checks`` (the study's ``reproduction`` record) whether a resumed seed's retrained warm start gives
    the recorded round-0 ``metric``. Training is deterministic on one machine but not across machines (runs differ
    by a few hundredths of Dice per round), so a mismatch stops the study, unless ``--other-machine`` accepts the
    mix, which is then recorded. The first check comes before any new seed is written."""
    same = abs(retrained - recorded) < 1e-9
    checks.append({"seed": seed, "metric": metric, "recorded": recorded, "retrained": retrained, "reproduces": same})
    verdict = "reproduces" if same else "DIFFERS FROM"
    print(f"seed {seed}: the retrained warm start's {metric} {retrained:.6f} {verdict} the recorded {recorded:.6f}")
    if not same and not args.other_machine:
        raise SystemExit(
            f"--resume: seed {seed}'s warm start, retrained here, gives {metric} {retrained:.6f} where the recorded "
            f"study has {recorded:.6f}: this machine does not repeat its runs, so resuming would mix machines "
            "(--other-machine goes on anyway and records the mismatch)"
        )


def study_seeds(
    trainer,
    scorer,
    images: Dict[str, Any],
    cases: Dict[str, Dict],
    strategies: Sequence[str],
    args: argparse.Namespace,
    results: Dict[str, Dict[int, List[Dict]]],
    reference: List[Dict],
    initial: Callable[[int], List[str]],
    save: Callable[[], Any],
    checks: List[Dict],
    metric: str = "dice",
) -> None:
    """Every seed up to ``args.seeds`` with work left: a warm start on ``initial(seed)``, one :func:`run` per strategy
    without a run for that seed in ``results``, and the all-labels reference (the warm start fine-tuned on every pool
    case for the same total steps) when ``reference`` lacks it; ``save`` after each seed, so that an interrupted
    study keeps its finished seeds. A resumed study first checks that this machine repeats its recorded runs (see
    :func:`check_reproduction`, which appends to ``checks``): on the first seed to run when that seed has recorded
    runs, else by retraining the first recorded seed's warm start."""
    total_steps = args.steps * math.ceil((args.max_labels - args.initial) / args.batch)
    recorded_seeds = sorted({seed for by_seed in results.values() for seed in by_seed})

    def check(seed: int, warm: torch.nn.Module) -> None:  # on a copy: evaluating switches to eval mode
        recorded = next(by_seed[seed][0][metric] for by_seed in results.values() if seed in by_seed)
        check_reproduction(seed, trainer.evaluate(copy.deepcopy(warm))[metric], recorded, metric, args, checks)

    pending = [
        s for s in range(args.seeds) if s >= len(reference) or any(s not in results.get(t, {}) for t in strategies)
    ]
    if pending and recorded_seeds and pending[0] not in recorded_seeds:
        check(recorded_seeds[0], warm_start(trainer, recorded_seeds[0], initial(recorded_seeds[0]), args.warmup_steps))
    for seed in pending:
        todo = [s for s in strategies if seed not in results.setdefault(s, {})]
        first = initial(seed)
        t0 = time.time()
        warm = warm_start(trainer, seed, first, args.warmup_steps)
        print(f"seed {seed}: initial {first}, warm start in {time.time() - t0:.0f}s", flush=True)
        if seed in recorded_seeds:
            check(seed, warm)
        for strategy in todo:
            results[strategy][seed] = run(strategy, seed, warm, first, trainer, scorer, images, cases, args, metric)
        if seed >= len(reference):
            full = copy.deepcopy(warm)
            seed_training(trainer, 1000 * seed + 17)
            trainer.train(full, sorted(cases), total_steps, random.Random(seed))
            reference.append({"seed": seed, **trainer.evaluate(full)})
            print(f"seed {seed}: all {len(cases)} labels -> {metric} {reference[-1][metric]:.3f}", flush=True)
        save()


def study_beyond(
    trainer,
    scorer,
    images: Dict[str, Any],
    cases: Dict[str, Dict],
    args: argparse.Namespace,
    results: Dict[str, Dict[int, List[Dict]]],
    reference: List[Dict],
    beyond: Dict[str, Any],
    initial: Callable[[int], List[str]],
    save: Callable[[], Any],
    metric: str = "dice",
) -> None:
    """Random again in every recorded seed, on past ``--max-labels`` up to ``--beyond`` labels, so that the labels
    random needs to reach the target are measured where the study's budget cuts them off. The target stays the
    study's (its reference trains for the study's total steps). Seeds in which random misses the target within the
    budget go first; ``save`` after each, so that an interrupted run keeps its seeds in ``beyond["runs"]`` (the rows
    from the study's last label count on). Each rerun must repeat its recorded rows exactly, as resuming on the
    recording machine does; else it stops before writing, unless ``--other-machine`` (recorded per seed)."""
    target = target_of(reference, args.fraction, metric)
    recorded = results["random"]
    longer = copy.copy(args)
    longer.max_labels = args.beyond

    def reached(seed: int) -> bool:
        return labels_to_reach({row["labels"]: row[metric] for row in recorded[seed]}, target) is not None

    for seed in sorted(recorded, key=lambda s: (reached(s), s)):
        if seed in beyond["runs"]:
            continue
        first = initial(seed)
        rows = run(
            "random",
            seed,
            warm_start(trainer, seed, first, args.warmup_steps),
            first,
            trainer,
            scorer,
            images,
            cases,
            longer,
            metric,
        )
        n = len(recorded[seed])
        differ = max(abs(a[metric] - b[metric]) for a, b in zip(rows[:n], recorded[seed]))
        beyond["repeats"][seed] = {"max_difference": differ, "reproduces": differ < 1e-9}
        if differ >= 1e-9 and not args.other_machine:
            raise SystemExit(
                f"--beyond: seed {seed}'s random run, repeated here, differs from the recorded one by up to "
                f"{differ:.6f} {metric}: this machine does not repeat its runs (--other-machine goes on anyway)"
            )
        beyond["runs"][seed] = rows[n - 1 :]
        save()


def random_beyond(results: Dict[str, Dict[int, List[Dict]]], beyond: Dict[str, Any]) -> Dict[int, List[Dict]]:
    """Random's runs joined with their continuations past the study's budget (``study_beyond``), where there is
    one."""
    joined = {}
    for seed, rows in results["random"].items():
        more = beyond["runs"].get(seed, [])
        joined[seed] = rows + [row for row in more if row["labels"] > rows[-1]["labels"]]
    return joined


def summarise_beyond(
    results: Dict[str, Dict[int, List[Dict]]],
    beyond: Dict[str, Any],
    target: float,
    table: Dict[str, Dict[str, Any]],
    metric: str = "dice",
) -> Dict[str, Any]:
    """What random's continuation past the budget measures: its labels to ``target`` per seed (``None``: not
    reached within ``beyond["max_labels"]``, or not run past the budget yet), and when every seed that missed the
    target has run on, each strategy's mean per-seed labels relative to random's (a seed that never reaches it
    counts at its cap: random's at ``beyond["max_labels"]``, the others' at the study's); when every seed has run
    on, random's mean curve and each strategy's labels by the mean curves relative to random's, with the seeds
    resampled. A strategy that has not run in all of random's seeds yet (added with ``--resume``) is left out.
    ``table`` is :func:`summarise`'s per-strategy summary."""
    joined = random_beyond(results, beyond)
    study_cap = max(row["labels"] for rows in results["random"].values() for row in rows)
    per_seed = {s: labels_to_reach({r["labels"]: r[metric] for r in rows}, target) for s, rows in joined.items()}
    missing = [s for s, v in per_seed.items() if v is None and s not in beyond["runs"]]
    out: Dict[str, Any] = {
        "max_labels": beyond["max_labels"],
        "seeds_run_on": sorted(beyond["runs"]),
        "repeats": all(r["reproduces"] for r in beyond["repeats"].values()),
        "random_labels_to_target_per_seed": [per_seed[s] for s in sorted(per_seed)],
        "strategies": {},
    }
    if missing:
        return out
    seeds = sorted(joined)
    base = [v if v is not None else float(beyond["max_labels"]) for v in (per_seed[s] for s in seeds)]
    everyone = len(beyond["runs"]) == len(joined)
    if everyone:
        mean = {n: float(np.mean(v)) for n, v in per_labels(joined, metric).items()}
        out[f"random_mean_{metric}"] = mean
        out["random_labels_to_target"] = labels_to_reach(mean, target)
    for strategy, by_seed in results.items():
        if any(s not in by_seed for s in seeds):
            continue  # a strategy added to the study that has not run in every seed yet
        reached = (
            [per_seed[s] for s in seeds]
            if strategy == "random"
            else [labels_to_reach({r["labels"]: r[metric] for r in by_seed[s]}, target) for s in seeds]
        )
        cap = beyond["max_labels"] if strategy == "random" else study_cap
        own = [v if v is not None else float(cap) for v in reached]
        row: Dict[str, Any] = {
            "mean_labels_per_seed": float(np.mean(own)),
            "relative_per_seed": float(np.mean(own) / np.mean(base)),
            "seeds_not_reaching": sum(v is None for v in reached),
            "cap": cap,
        }
        if everyone and strategy != "random":
            mine = table[strategy]["labels_to_target"]  # the summary's, by the strategy's own mean curve
            base_mean = out["random_labels_to_target"]
            row["relative_to_random"] = mine / base_mean if mine is not None and base_mean else None
            row["relative_to_random_interval"] = relative_interval(
                {"random": joined, strategy: by_seed}, strategy, target, metric
            )
        out["strategies"][strategy] = row
    return out


def study_arguments(ap: argparse.ArgumentParser, **defaults: Any) -> None:
    """The options both studies take; ``defaults`` overrides their defaults (e.g. ``steps=300``)."""
    d = {"seeds": 3, "initial": 2, "batch": 2, "max_labels": 14, "warmup_steps": 600, "steps": 200, "lr": 1e-3}
    d.update(defaults)
    ap.add_argument("--seeds", type=int, default=d["seeds"])
    ap.add_argument("--initial", type=int, default=d["initial"], help="labeled cases at the start")
    ap.add_argument("--batch", type=int, default=d["batch"], help="cases labeled per round")
    ap.add_argument("--max-labels", type=int, default=d["max_labels"])
    ap.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    ap.add_argument("--steps", type=int, default=d["steps"], help="fine-tuning steps per round")
    ap.add_argument("--lr", type=float, default=d["lr"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=0.95, help="target: this fraction of the all-labels result")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument(
        "--resume",
        type=Path,
        help="a results .json of the same study (every setting but --seeds and --strategies must match): its runs "
        "and references are kept, and only what is missing runs: more seeds, or strategies it lacks",
    )
    ap.add_argument(
        "--render",
        type=Path,
        help="only re-write a recorded results .json's report and plot (summary recomputed, notes as in the .json)",
    )
    ap.add_argument(
        "--redo",
        default="",
        help="with --resume: comma-separated strategies whose recorded runs are dropped (those also in --strategies "
        "run again, with the same seeds as the new ones)",
    )
    ap.add_argument(
        "--other-machine",
        action="store_true",
        help="with --resume: go on even when this machine does not repeat the recorded runs (the mismatch is "
        "recorded); without it such a resume stops before writing anything",
    )


def parse_strategies(ap: argparse.ArgumentParser, text: str, allowed: Sequence[str]) -> List[str]:
    """The comma-separated strategies, which must include random and come from ``allowed``."""
    strategies = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in allowed]
    if unknown or "random" not in strategies:
        ap.error(f"strategies must include random and come from {tuple(allowed)}; got {unknown or strategies}")
    return strategies


# ------------------------------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------------------------------
def labels_to_reach(curve: Dict[int, float], target: float) -> float | None:
    """Labels at which a curve first reaches ``target`` (linear interpolation between rounds)."""
    points = sorted(curve.items())
    for (l0, d0), (l1, d1) in zip([(None, None)] + points[:-1], points):
        if d1 >= target:
            if l0 is None or d0 is None or d1 == d0:
                return float(l1)
            return float(l0 + (target - d0) / (d1 - d0) * (l1 - l0))
    return None


def target_of(reference: List[Dict], fraction: float, metric: str = "dice") -> float:
    """The study's target: ``fraction`` of the all-labels references' mean ``metric``."""
    return fraction * float(np.mean([r[metric] for r in reference]))


def summarise(
    results: Dict[str, Dict[int, List[Dict]]],
    reference: List[Dict],
    fraction: float,
    metric: str = "dice",
    beyond: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Mean and spread of ``metric`` per strategy and number of labels, and the labels each strategy needs to reach
    ``fraction`` of the all-labels reference, relative to random (and with random run on past the budget, when
    ``beyond`` has that: :func:`summarise_beyond`). Keys are named after the metric (``mean_dice``)."""
    m = metric
    ref = float(np.mean([r[m] for r in reference]))
    target = target_of(reference, fraction, m)
    table = {}
    for strategy, by_seed in results.items():
        values = per_labels(by_seed, m)
        labels = list(values)
        mean = {n: float(np.mean(v)) for n, v in values.items()}
        std = {n: float(np.std(v)) for n, v in values.items()}
        per_seed = [labels_to_reach({row["labels"]: row[m] for row in rows}, target) for rows in by_seed.values()]
        picked = [p for rows in by_seed.values() for row in rows for p in row.get("picked", [])]
        aucs = _separations(by_seed, "entropy")
        key = SCORE_KEY.get(strategy)
        own = _separations(by_seed, key) if key else []
        distance = _separations(by_seed, "centre_distance")
        later = [n for n in labels if n > labels[0]]
        table[strategy] = {
            "labels": labels,
            f"mean_{m}_over_rounds": float(np.mean([mean[n] for n in later])) if later else None,
            f"mean_{m}": mean,
            f"std_{m}": std,
            "labels_to_target": labels_to_reach(mean, target),
            "labels_to_target_per_seed": per_seed,
            "rare_fraction_picked": float(np.mean([p["rare"] for p in picked])) if picked else None,
            "entropy_auc_rare_vs_common": float(np.mean(aucs)) if aucs else None,
            "score_auc_rare_vs_common": float(np.mean(own)) if own else None,
            "centre_distance_auc_rare_vs_common": float(np.mean(distance)) if distance else None,
            f"final_{m}_rare": float(np.nanmean([rows[-1][f"{m}_rare"] for rows in by_seed.values()])),
        }
    final = _final_mean(table.get("random"), m)
    for strategy, row in table.items():
        row["relative_to_random_interval"] = relative_interval(results, strategy, target, m)
        row["labels_to_random_final"] = labels_to_reach(row[f"mean_{m}"], final) if final is not None else None
    for labels, relative in (
        ("labels_to_target", "relative_to_random"),
        ("labels_to_random_final", "relative_at_random_final"),
    ):
        base = table.get("random", {}).get(labels)
        for row in table.values():
            row[relative] = (row[labels] / base) if (row[labels] is not None and base) else None
    summary = {f"reference_{m}": ref, f"target_{m}": target, "fraction": fraction, "metric": m, "strategies": table}
    if beyond:
        summary["beyond"] = summarise_beyond(results, beyond, target, table, m)
    return summary


def _final_mean(row: Optional[Dict[str, Any]], metric: str) -> Optional[float]:
    """A strategy's mean result with its most labels: what the others are measured against when random never
    reaches the target (a larger pool than labels it can buy)."""
    return at_labels(row[f"mean_{metric}"], row["labels"][-1]) if row else None


def per_labels(by_seed: Dict[int, List[Dict]], metric: str) -> Dict[int, List[float]]:
    """The values of ``metric`` over all seeds, by number of labels."""
    values: Dict[int, List[float]] = {}
    for rows in by_seed.values():
        for row in rows:
            values.setdefault(row["labels"], []).append(row[metric])
    return dict(sorted(values.items()))


def relative_interval(
    results: Dict[str, Dict[int, List[Dict]]], strategy: str, target: float, metric: str, draws: int = 2000
) -> Optional[List[float]]:
    """A 95% bootstrap interval of a strategy's labels to ``target`` relative to random's, resampling the seeds
    both ran (paired: a seed's runs share its warm start). A resample whose mean curve never reaches the target
    counts as needing more labels than any that does (a bound of ``None``: never; dropped when random never does)."""
    seeds = sorted(set(results.get(strategy, {})) & set(results.get("random", {})))
    if strategy == "random" or len(seeds) < 2:
        return None
    rng = np.random.default_rng(0)
    base_curves, own_curves = (_curve_table(results[s], seeds, metric) for s in ("random", strategy))
    ratios = []
    for _ in range(draws):
        sample = rng.choice(len(seeds), size=len(seeds))
        base = labels_to_reach(_resampled_mean(*base_curves, sample), target)
        own = labels_to_reach(_resampled_mean(*own_curves, sample), target)
        if base:
            ratios.append(own / base if own is not None else np.inf)
    if not ratios:
        return None
    bounds = [float(np.percentile(ratios, q, method="lower" if q < 50 else "higher")) for q in (2.5, 97.5)]
    return [b if math.isfinite(b) else None for b in bounds]


def _curve_table(by_seed: Dict[int, List[Dict]], seeds: Sequence[int], metric: str) -> Tuple[List[int], np.ndarray]:
    """Label counts and a seeds x label counts table of ``metric`` (NaN where a seed's run lacks that count)."""
    labels = sorted({row["labels"] for seed in seeds for row in by_seed[seed]})
    table = np.full((len(seeds), len(labels)), np.nan)
    for i, seed in enumerate(seeds):
        for row in by_seed[seed]:
            table[i, labels.index(row["labels"])] = row[metric]
    return labels, table


def _resampled_mean(labels: List[int], table: np.ndarray, sample: np.ndarray) -> Dict[int, float]:
    """The mean curve (mean per label count) over the rows ``sample`` of a :func:`_curve_table`; the rows repeat as
    the sample does."""
    rows = table[sample]
    present = ~np.isnan(rows).all(axis=0)
    means = np.nanmean(rows[:, present], axis=0)
    return {int(n): float(m) for n, m in zip(np.asarray(labels)[present], means)}


def _separations(by_seed: Dict[int, List[Dict]], key: str) -> List[float]:
    """Every round's AUC of the score ``key`` for the rare subgroup against the rest."""
    name = f"{key}_rare_vs_common"
    return [row[name][f"auc_{key}_rare"] for rows in by_seed.values() for row in rows if row.get(name)]


def at_labels(curve: Dict[Any, float], n: int) -> float:
    """A curve's value at ``n`` labels, whether its keys are numbers (in memory) or strings (read back from JSON)."""
    return curve[n] if n in curve else curve[str(n)]


def plot(summary: Dict[str, Any], out: Path, title: str, ylabel: str = "held-out mean Dice") -> None:
    """Learning curves: the mean of the summary's metric per strategy with its spread over seeds, the all-labels
    reference and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary.get("metric", "dice")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, row in summary["strategies"].items():
        x = np.array(row["labels"])
        m = np.array([at_labels(row[f"mean_{metric}"], n) for n in row["labels"]])
        s = np.array([at_labels(row[f"std_{metric}"], n) for n in row["labels"]])
        (line,) = ax.plot(x, m, "o-", label=name, lw=2 if name != "random" else 2.5)
        ax.fill_between(x, m - s, m + s, color=line.get_color(), alpha=0.15)
    beyond = summary.get("beyond", {}).get(f"random_mean_{metric}")
    if beyond:
        last = max(summary["strategies"]["random"]["labels"])
        x = sorted(int(n) for n in beyond if int(n) >= last)  # the run-on part only
        ax.plot(x, [at_labels(beyond, n) for n in x], "--", color="gray", lw=1.5, label="random, run on")
    ax.axhline(summary[f"reference_{metric}"], color="k", ls="--", lw=1, label="all labels")
    target = f"{summary['fraction']:.0%} of all labels"
    ax.axhline(summary[f"target_{metric}"], color="gray", ls=":", lw=1, label=target)
    ax.set_xlabel("labeled cases")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)  # a study re-plots after every seed


def interval_text(interval: Optional[Sequence[float]]) -> str:
    """``61%-135%`` for a relative-labels interval; ``never`` for a bound that never reaches the target."""
    if not interval:
        return "-"
    return "-".join("never" if v is None else f"{v:.0%}" for v in interval)


def markdown(result: Dict[str, Any], image: str = "active_learning.png") -> str:
    """The study's report: its command, cohort, reference and one row per strategy, then the plot ``image``."""
    s = result["summary"]
    cfg = result["config"]
    rare = RARE_WORDS[cfg["rare"]]
    lines = [
        "# Active-learning study (simulated annotators)",
        "",
        f"`{result['command']}` on {result['machine']}, {result['minutes']:.0f} min.",
        "",
        *reproduction_text(result),
        f"Pool of {cfg['pool']} phantoms (from the sample data's generator, rendered small; "
        f"{cfg['pool_rare']} {rare}), {cfg['heldout']} held-out ({cfg['heldout_rare']} {rare}). "
        f"Start: {cfg['initial']} random labeled cases and "
        f"a model trained on them for {cfg['warmup_steps']} steps; each round fine-tunes {cfg['steps']} steps, "
        f"scores the pool and labels {cfg['batch']} more, up to {cfg['max_labels']}. {len(cfg['seeds'])} seeds. "
        f"Training spacing {cfg['spacing']} mm, scoring at {cfg['scoring_spacing_factor']:g}x that; "
        f"{cfg['mc_samples']} MC-dropout passes.",
        "",
        f"All-labels reference (same warm start and total steps on all {cfg['pool']} cases): "
        f"Dice **{s['reference_dice']:.3f}**; target = {s['fraction']:.0%} of it = {s['target_dice']:.3f}.",
        "",
        "| strategy | labels to reach the target | relative to random | 95% interval (seeds resampled) | per seed | "
        "labels to random's final Dice (relative) | mean Dice over rounds | "
        f"final Dice | final Dice on {rare} | {rare} among picks | entropy AUC {rare} vs the rest | "
        f"AUC of the strategy's own score | AUC of the distance to the labeled cases (embedding) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec=".1f", missing="not reached"):
        return missing if v is None else format(v, spec)

    for name, row in s["strategies"].items():
        last = row["labels"][-1]
        lines.append(
            f"| {name} | {fmt(row['labels_to_target'])} | {fmt(row['relative_to_random'], '.0%')} | "
            f"{interval_text(row.get('relative_to_random_interval'))} | "
            f"{', '.join(fmt(v, '.0f') for v in row['labels_to_target_per_seed'])} | "
            f"{fmt(row.get('labels_to_random_final'), missing='-')} "
            f"({fmt(row.get('relative_at_random_final'), '.0%', '-')}) | "
            f"{fmt(row['mean_dice_over_rounds'], '.3f')} | "
            f"{at_labels(row['mean_dice'], last):.3f} +- {at_labels(row['std_dice'], last):.3f} | "
            f"{row['final_dice_rare']:.3f} | "
            f"{fmt(row['rare_fraction_picked'], '.0%')} | "
            f"{fmt(row['entropy_auc_rare_vs_common'], '.2f', 'not scored')} | "
            f"{fmt(row.get('score_auc_rare_vs_common'), '.2f', '-')} | "
            f"{fmt(row.get('centre_distance_auc_rare_vs_common'), '.2f', '-')} |"
        )
    lines += [*beyond_text(s), "", f"![learning curves]({image})", "", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def beyond_text(summary: Dict[str, Any]) -> List[str]:
    """Report lines for random run on past the budget (:func:`summarise_beyond`), if it was."""
    b = summary.get("beyond")
    if not b:
        return []
    cap = b["max_labels"]
    done = set(b["seeds_run_on"])
    per_seed = [
        f"{v:.1f}" if v is not None else (f"not within {cap}" if seed in done else "not run on")
        for seed, v in enumerate(b["random_labels_to_target_per_seed"])
    ]
    repeats = "each repeats its recorded rounds exactly" if b["repeats"] else "NOT ALL REPEAT THEIR RECORDED ROUNDS"
    lines = [
        "",
        f"Random run on past the budget, up to {cap} labels (`--beyond {cap}`, the target unchanged; seeds "
        f"{', '.join(map(str, sorted(done))) or 'none yet'}; {repeats}). Random's labels to the target per seed: "
        f"{', '.join(per_seed)}"
        + (
            f"; by its mean curve {_labels_text(b['random_labels_to_target'], cap)}."
            if "random_mean_dice" in b
            else "."
        ),
    ]
    if b["strategies"]:
        lines += [
            "",
            "| strategy | mean labels to the target per seed | seeds not reaching it (counted at) | relative "
            "to random | relative to random by the mean curves | 95% interval (seeds resampled) |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in b["strategies"].items():
            lines.append(
                f"| {name} | {row['mean_labels_per_seed']:.1f} | {row['seeds_not_reaching']} ({row['cap']}) | "
                f"{row['relative_per_seed']:.0%} | "
                f"{_relative_text(row.get('relative_to_random'), 'relative_to_random' in row)} | "
                f"{interval_text(row.get('relative_to_random_interval'))} |"
            )
    return lines


def _labels_text(labels: Optional[float], cap: int) -> str:
    return f"{labels:.1f} labels" if labels is not None else f"not within {cap} labels"


def _relative_text(relative: Optional[float], measured: bool) -> str:
    if not measured:
        return "-"
    return f"{relative:.0%}" if relative is not None else "not reached"


# ------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="random,entropy,diversity,hybrid")
    ap.add_argument("--pool", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=16)
    ap.add_argument("--rare", choices=RARE, default="hard", help="the subgroup: " + ", ".join(RARE_WORDS.values()))
    ap.add_argument(
        "--rare-every",
        type=int,
        default=4,
        help="every Nth pool case is in the subgroup (default 4, as hard cases in the sample data)",
    )
    ap.add_argument("--heldout-rare-every", type=int, default=4, help="the same for the held-out cases")
    ap.add_argument("--spacing", type=float, default=STUDY_SPACING, help="training spacing in mm (isotropic)")
    ap.add_argument("--roi", default=",".join(map(str, STUDY_ROI)))
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--scoring-spacing-factor", type=float, default=2.0, help="as --conf scoring_spacing_factor")
    ap.add_argument("--hybrid-pool", type=float, default=0.5)
    ap.add_argument("--diversity-features", choices=tuple(FEATURES), default="bottleneck", help="as --conf")
    study_arguments(ap)
    ap.add_argument(
        "--beyond",
        type=int,
        default=0,
        help="with --resume: run random again in every recorded seed and on past --max-labels up to this many "
        "labels (the target stays the study's), so that its labels to the target are measured where the budget "
        "cuts them off; recorded under the study's 'beyond'",
    )
    args = ap.parse_args(argv)
    if args.render:
        print(render_recorded(args.render, markdown, "held-out mean Dice"))
        return 0
    strategies = parse_strategies(ap, args.strategies, (*SEG_STRATEGIES, *FEATURED, *RARITIES, *ORACLES))

    torch.set_num_threads(args.threads)
    start = time.time()
    conf = study_conf(args.spacing, tuple(int(v) for v in args.roi.split(",")))
    scorer = SegmentationScorer(conf, mc_samples=args.mc_samples, spacing_factor=args.scoring_spacing_factor)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("rendering the cohort ...", flush=True)
        pool = build_cohort(work, "seg", args.pool, 0, args.rare, args.rare_every)
        heldout = build_cohort(work, "seg_heldout", args.heldout, 0, args.rare, args.heldout_rare_every)
        cases = {c["id"]: c for c in pool}
        trainer = Trainer(conf, pool, heldout, work, args.lr)
        images = {c["id"]: scorer.load_image(c["image"]) for c in pool}
        print(f"cohort ready in {time.time() - start:.0f}s", flush=True)

        results, reference, start = resumed(args, strategies, start)
        checks: List[Dict] = recorded(args, "reproduction")  # read once: --out may be the resumed file
        beyond = resumed_beyond(args)

        def initial(seed: int) -> List[str]:
            return random.Random(seed).sample(sorted(cases), args.initial)

        def save() -> Dict[str, Any]:
            return write_results(args, argv, start, results, reference, pool, heldout, scorer, checks, beyond)

        study_seeds(
            trainer,
            scorer,
            images,
            cases,
            strategies,
            args,
            results,
            reference,
            initial=initial,
            save=save,
            checks=checks,
        )
        if args.beyond:
            study_beyond(trainer, scorer, images, cases, args, results, reference, beyond, initial, save)

    print(markdown(save()))
    return 0


def resumed(
    args: argparse.Namespace, strategies: Sequence[str], start: float
) -> Tuple[Dict[str, Dict[int, List[Dict]]], List[Dict], float]:
    """Runs, references and start time to go on from: empty, or those of ``--resume`` (a previous result of the same
    study: every setting but the seeds and the strategies must match) without the ``--redo`` strategies' runs, so
    that seeds or strategies can be added to it (its minutes count as spent)."""
    if not args.resume:
        return {s: {} for s in strategies}, [], start
    previous = json.loads(args.resume.read_text())
    config = previous["config"]
    mine = {k: v for k, v in vars(args).items() if k not in (*UNRECORDED, "seeds", "strategies", "redo")}
    differ = [k for k, v in mine.items() if k in config and config[k] != v]
    if differ:
        raise SystemExit(f"--resume {args.resume}: another study ({', '.join(f'{k}={config[k]!r}' for k in differ)})")
    runs = {s: {int(seed): rounds for seed, rounds in by_seed.items()} for s, by_seed in previous["runs"].items()}
    for name in (s.strip() for s in args.redo.split(",")):
        runs.pop(name, None)
    reference = list(previous["reference"])[: args.seeds]  # a study of fewer seeds keeps their references only
    print(f"resumed {len(reference)} seed(s) of {', '.join(runs)} from {args.resume}", flush=True)
    runs.update({s: {} for s in strategies if s not in runs})
    return runs, reference, start - 60.0 * float(previous.get("minutes", 0.0))


def resumed_beyond(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """Random's continuation past the budget to go on from: that of ``--resume`` (which must have been run to the
    same ``--beyond``), an empty one when ``--beyond`` starts it, else ``None``."""
    previous = json.loads(args.resume.read_text()).get("beyond") if args.resume else None
    if previous and args.beyond and previous["max_labels"] != args.beyond:
        raise SystemExit(
            f"--resume {args.resume}: random was run on to {previous['max_labels']} labels, not {args.beyond}"
        )
    if previous:
        return read_beyond(previous)
    if args.beyond and not args.resume:
        raise SystemExit("--beyond runs random on past the budget of a recorded study: it needs --resume")
    return {"max_labels": args.beyond, "runs": {}, "repeats": {}} if args.beyond else None


def read_beyond(recorded: Dict[str, Any]) -> Dict[str, Any]:
    """A ``beyond`` record read back from JSON, with its seeds as numbers again."""
    return {
        "max_labels": recorded["max_labels"],
        "runs": {int(k): v for k, v in recorded["runs"].items()},
        "repeats": {int(k): v for k, v in recorded["repeats"].items()},
    }


def write_study(
    name: str,
    args: argparse.Namespace,
    argv,
    start: float,
    results: Dict[str, Dict[int, List[Dict]]],
    reference: List[Dict],
    pool: List[Dict],
    config: Dict[str, Any],
    render: Callable[[Dict[str, Any], str], str],
    metric: str = "dice",
    ylabel: str = "held-out mean Dice",
    extra: Optional[Callable[[Dict[str, Dict[int, List[Dict]]]], Dict[str, Any]]] = None,
    checks: Sequence[Dict] = (),
    beyond: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Write ``<name>.{json,md,png}`` to ``args.out`` for the seeds finished so far (called after every seed):
    the runs, the all-labels references, the summary, the learning curves and the Markdown from ``render``.
    ``config`` and ``extra(runs)`` add the study's own fields; ``checks`` are the reproduction checks (those of the
    ``--resume`` study, then this run's); ``beyond`` is random's continuation past the budget
    (:func:`study_beyond`)."""
    done = len(reference)
    results = {s: {k: v for k, v in by_seed.items() if k < done} for s, by_seed in results.items()}
    result = {
        "command": command(f"{name}.py", argv),
        "machine": machine(),
        "minutes": (time.time() - start) / 60.0,
        "config": {
            **{k: v for k, v in vars(args).items() if k not in UNRECORDED},
            "strategies": ",".join(results),
            "seeds": list(range(done)),
            **config,
        },
        "summary": summarise(results, reference, args.fraction, metric, beyond),
        **(extra(results) if extra else {}),
        **({"beyond": beyond} if beyond else {}),
        "reproduction": list(checks),
        "notes": recorded(args, "notes"),
        "reference": reference,
        "runs": results,
        "cases": [{k: v for k, v in c.items() if k not in ("image", "label")} for c in pool],
    }
    publish_study(result, args.out / f"{name}.json", render, ylabel)
    return result


def publish_study(result: Dict[str, Any], path: Path, render: Callable[[Dict[str, Any], str], str], ylabel: str) -> str:
    """Write a study's ``result`` to ``path`` (``<name>.json``) with its Markdown report and learning curves beside
    it (``<name>.md``, ``<name>.png``); the report."""
    cfg = result["config"]
    title = f"{cfg['pool']}-case pool, {len(cfg['seeds'])} seeds, {cfg['steps']} steps/round (mean +- std over seeds)"
    path.parent.mkdir(parents=True, exist_ok=True)
    plot(result["summary"], path.with_suffix(".png"), title, ylabel)
    path.write_text(json.dumps(result, indent=1, default=float))
    report = render(result, path.with_suffix(".png").name)
    path.with_suffix(".md").write_text(report)
    return report


def render_recorded(path: Path, render: Callable[[Dict[str, Any], str], str], ylabel: str) -> str:
    """Re-write a recorded study (``<name>.json``) and its report and plot beside it, with the summary recomputed
    from its runs and references; the command, minutes and notes stay as recorded. This is how a study's written
    notes are changed (edit ``notes`` in the JSON, then render) without running it again. Returns the report."""
    result = json.loads(path.read_text())
    runs = {s: {int(seed): rounds for seed, rounds in by_seed.items()} for s, by_seed in result["runs"].items()}
    metric = result["summary"].get("metric", "dice")
    beyond = read_beyond(result["beyond"]) if "beyond" in result else None
    result["summary"] = summarise(runs, result["reference"], result["config"]["fraction"], metric, beyond)
    return publish_study(result, path, render, ylabel)


def recorded(args: argparse.Namespace, key: str) -> List[Any]:
    """A list the ``--resume`` study recorded (its written ``notes``, its ``reproduction`` checks), kept so that
    adding seeds or strategies does not drop it."""
    return json.loads(args.resume.read_text()).get(key, []) if getattr(args, "resume", None) else []


def reproduction_text(result: Dict[str, Any]) -> List[str]:
    """Report lines for a resumed study: whether the machine that added to it repeated the recorded runs."""
    lines = []
    for c in result.get("reproduction", []):
        verdict = (
            "as recorded" if c["reproduces"] else f"where the recorded runs have {c['recorded']:.6f}: MIXED MACHINES"
        )
        lines.append(
            f"Resumed: seed {c['seed']}'s warm start, retrained, gives {c['metric']} {c['retrained']:.6f}, {verdict}."
        )
    return [*lines, ""] if lines else []


def write_results(args, argv, start, results, reference, pool, heldout, scorer, checks, beyond) -> Dict[str, Any]:
    """This study's results so far."""
    config = {
        "pool_rare": sum(c["rare"] for c in pool),
        "heldout_rare": sum(c["rare"] for c in heldout),
        "scoring_spacing": list(scorer.spacing),
    }
    return write_study(
        "active_learning", args, argv, start, results, reference, pool, config, markdown, checks=checks, beyond=beyond
    )


if __name__ == "__main__":
    sys.exit(main())
