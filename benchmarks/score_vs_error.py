"""How well does each active-learning score rank the pool by the model's actual error?

    python benchmarks/score_vs_error.py --seeds 2 --labels 2,6,12

An uncertainty strategy can only save labels if its score points at the cases the model gets wrong. This measures
that directly, on the pool of the active-learning study (``active_learning.py --pool 120 --rare native
--rare-every 10``; ``--rare mirrored`` for its situs-inversus cohort): each seed starts from the study's warm start
(same initial cases and steps), then labels random cases in rounds of ``--batch`` with ``--steps`` fine-tuning steps,
as the study's random strategy does (with draws of its own, so not the same cases). At each of ``--labels`` it scores
every pool case with the server's ``SegmentationScorer`` and measures every unlabeled case's Dice against its ground
truth, then reports per score:

- the rank correlation (Spearman) between the score and the case's Dice error (1 - mean Dice over organs);
- the mean error of the ``--batch`` cases the score ranks first, relative to the pool's mean error (1: no better
  than random picks; the "oracle" row ranks by the error itself, the most any score could reach);
- the AUC with which it tells the rare subgroup's cases from the rest.

Scores: ``entropy``, ``mutual_information`` (``bald``), ``tta``, ``foreground_fraction``, the structure-wise
``expected_dice_loss`` and ``sample_dice_loss``, the distance to the nearest labeled case in the bottleneck
embedding (``diversity``), in the appearance features, in the layout features and in both joined, all from the
server's scorer (at ``--scoring-spacing-factor`` times the training spacing), and the ``fragmentation`` of the
prediction at the training spacing.

Writes ``score_vs_error.{json,md}`` to ``--out`` (``score_vs_error_<rare>`` for another subgroup than native phase).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from active_learning import RARE, RARE_WORDS, Trainer, build_cohort, seed_training, study_conf
from classification import pair_auc
from common import command, machine, write_results

from labelloop_app.activelearning.config import FEATURES
from labelloop_app.activelearning.segmentation import SegmentationScorer
from labelloop_app.activelearning.strategies import centre_distances, feature_vectors

HERE = Path(__file__).resolve().parent
STORED = ("entropy", "mutual_information", "tta", "foreground_fraction", "expected_dice_loss", "sample_dice_loss")
DISTANCES = {f"{'_'.join(f.keys)}_distance": f.keys for f in FEATURES.values()}
"""Distance scores, in each of the server's ``--conf diversity_features`` spaces -> the feature vectors it joins."""
SCORES = (*STORED, *DISTANCES, "fragmentation", "oracle")


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties broken by order: the scores here are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def top_error_ratio(score: Sequence[float], error: Sequence[float], k: int) -> float:
    """Mean error of the ``k`` highest-scored cases over the mean error of all."""
    top = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")[:k]
    return float(np.asarray(error)[top].mean() / np.mean(error))


def checkpoint_scores(
    records: Dict[str, Dict[str, Any]],
    labeled: Sequence[str],
    unlabeled: Sequence[str],
    error: Dict[str, float],
    fragments: Dict[str, float],
) -> Dict[str, List[float]]:
    """Every score of the unlabeled cases, in ``unlabeled``'s order."""
    scores = {key: [float(records[i][key]) for i in unlabeled] for key in STORED}
    for name, keys in DISTANCES.items():
        distance = centre_distances(unlabeled, labeled, feature_vectors(records, keys))
        scores[name] = [distance[i] for i in unlabeled]
    scores["fragmentation"] = [fragments[i] for i in unlabeled]
    scores["oracle"] = [error[i] for i in unlabeled]
    return scores


def measure(
    scores: Dict[str, List[float]], unlabeled: Sequence[str], error: Dict[str, float], rare: Dict[str, bool], k: int
) -> Dict[str, Dict[str, float]]:
    """Per score: rank correlation with the error, error of its top ``k`` relative to the mean, AUC rare vs rest."""
    err = [error[i] for i in unlabeled]
    out = {}
    for name, values in scores.items():
        auc = pair_auc(
            [v for v, i in zip(values, unlabeled) if rare[i]], [v for v, i in zip(values, unlabeled) if not rare[i]]
        )
        out[name] = {
            "spearman": round(rank_correlation(values, err), 3),
            "top_error_ratio": round(top_error_ratio(values, err, k), 3),
            "auc_rare": None if auc is None else round(auc, 3),
        }
    return out


def mean_of(values: Sequence[Any], spec: str = ".2f") -> str:
    """The mean of the defined values, or "-"."""
    defined = [v for v in values if v is not None and not np.isnan(v)]
    return f"{np.mean(defined):{spec}}" if defined else "-"


def mean_dice(values: Sequence[float]) -> Any:
    """The mean, or None for no cases (a subgroup all labeled)."""
    return float(np.mean(values)) if len(values) else None


def markdown(result: Dict[str, Any]) -> List[str]:
    rows = result["checkpoints"]
    rare = RARE_WORDS[result["config"].get("rare", "native")]
    where = ", ".join(f"seed {r['seed']} at {r['labels']} labels" for r in rows)
    lines = [
        "# Which score points at the model's errors?",
        "",
        f"`{result['command']}` on {result['machine']}, {result['minutes']:.0f} min.",
        "",
        f"Pool of {result['config']['pool']} ({result['config']['pool_rare']} {rare}); models trained on "
        f"random labels as in the active-learning study; {len(rows)} checkpoints "
        f"({where}).",
        "",
        "| score | rank correlation with the Dice error (mean; per checkpoint) | error of the top "
        f"{result['config']['batch']} / mean error | AUC {rare} vs rest |",
        "|---|---|---|---|",
    ]
    for name in (n for n in SCORES if n in rows[0]["scores"]):  # studies recorded before a score lack it
        per = [r["scores"][name] for r in rows]
        rho = [p["spearman"] for p in per]
        lines.append(
            f"| {name} | {np.mean(rho):.2f}; {', '.join(f'{v:.2f}' for v in rho)} | "
            f"{mean_of([p['top_error_ratio'] for p in per])} | {mean_of([p['auc_rare'] for p in per])} |"
        )
    lines += [
        "",
        f"| seed | labels | pool Dice (unlabeled) | its {rare} | AUC of the error, {rare} vs rest |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['labels']} | {r['pool_dice']:.3f} | {mean_of([r['pool_dice_rare']], '.3f')} | "
            f"{mean_of([r['scores']['oracle']['auc_rare']])} |"
        )
    return lines + ["", *result.get("notes", [])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--labels", default="2,6,12", help="numbers of labeled cases at which to measure")
    ap.add_argument("--pool", type=int, default=120)
    ap.add_argument("--rare", choices=RARE, default="native", help="the subgroup, as in active_learning.py")
    ap.add_argument("--rare-every", type=int, default=10, help="every Nth pool case is in the subgroup")
    ap.add_argument("--scoring-spacing-factor", type=float, default=2.0, help="as --conf scoring_spacing_factor")
    ap.add_argument("--initial", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--mc-samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    checkpoints = sorted(int(v) for v in args.labels.split(","))

    torch.set_num_threads(args.threads)
    start = time.time()
    conf = study_conf()
    scorer = SegmentationScorer(conf, mc_samples=args.mc_samples, spacing_factor=args.scoring_spacing_factor)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pool = build_cohort(Path(tmp), "seg", args.pool, 0, args.rare, args.rare_every)
        cases = {c["id"]: c for c in pool}
        rare = {i: c["rare"] for i, c in cases.items()}
        trainer = Trainer(conf, pool, [], Path(tmp), 1e-3)
        images = {i: scorer.load_image(c["image"]) for i, c in cases.items()}
        for seed in range(args.seeds):
            labeled = random.Random(seed).sample(sorted(cases), args.initial)
            seed_training(trainer, seed)
            network = trainer.new_network()
            trainer.train(network, labeled, args.warmup_steps, random.Random(seed))
            rng = random.Random(1000 * seed)
            seed_training(trainer, 1000 * seed + 17)
            while True:
                if len(labeled) in checkpoints:
                    evaluated = trainer.pool_cases(network, list(cases))
                    dice = {c["id"]: c["mean"] for c in evaluated}
                    error = {i: 1.0 - d for i, d in dice.items()}
                    fragments = {c["id"]: c["fragmentation"] for c in evaluated}
                    records = {i: scorer.score(network, images[i]) for i in cases}
                    unlabeled = [i for i in cases if i not in labeled]
                    scores = checkpoint_scores(records, labeled, unlabeled, error, fragments)
                    row = {
                        "seed": seed,
                        "labels": len(labeled),
                        "pool_dice": float(np.mean([dice[i] for i in unlabeled])),
                        "pool_dice_rare": mean_dice([dice[i] for i in unlabeled if rare[i]]),
                        "scores": measure(scores, unlabeled, error, rare, args.batch),
                    }
                    rows.append(row)
                    rho = {k: v["spearman"] for k, v in row["scores"].items()}
                    print(f"seed {seed}, {len(labeled)} labels: rank correlations {rho}", flush=True)
                if len(labeled) >= checkpoints[-1]:
                    break
                trainer.train(network, labeled, args.steps, rng)
                labeled += rng.sample([i for i in cases if i not in labeled], args.batch)

    result = {
        "command": command("score_vs_error.py", argv),
        "machine": machine(),
        "minutes": (time.time() - start) / 60.0,
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "pool_rare": sum(rare.values())},
        "checkpoints": rows,
    }
    name = "score_vs_error" if args.rare == "native" else f"score_vs_error_{args.rare}"
    write_results(args.out, name, result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
