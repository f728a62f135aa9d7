"""Simulated annotation study for classification: how many class labels uncertainty sampling needs, against random.

    python benchmarks/active_learning_classification.py --seeds 4

That is the recorded study (111 min on 2 cores, its first hour beside another benchmark).

The classification counterpart of ``active_learning.py``, with the same loop, strategy classes, leases and summary:
an oracle plays the annotators. The pool is ``--pool`` lesion phantoms of the generator's ``cls`` cohort and the
held-out set ``--heldout`` of its ``cls_heldout`` cohort (generator seed 2, independent of the sample data and of
the classification benchmark's extra cases), at their native size and spacing. Each seed starts from ``--initial``
labeled cases (half with a lesion) and a detector trained on them (``--warmup-steps``). Every round fine-tunes for
``--steps`` (the detector train task's transforms, loss and optimizer, in-process; batches drawn class-balanced as
the server's sampler does), fits the evidence calibration on the labeled cases (the server fits it on its
validation split of them), measures the held-out ROC AUC, scores the pool with the uncertainty the
``classification`` infer task reports, and lets the server's ``cls_*`` strategies hand out ``--batch`` images; the
oracle reveals their class and lesion (a finding, as the sample data's class labels carry). The reference is the
same warm start fine-tuned on every pool case for the same total steps.

With two classes, predictive entropy, margin and least confidence are all decreasing functions of the top class
probability, so they rank the pool identically; the study runs ``cls_entropy`` for the three unless asked.
``cls_finding`` ranks by the probability of a finding instead (the lesion, here). Its recorded study runs random
and ``cls_finding`` again from shared warm starts and keeps only the all-labels references of the study above
(``--redo`` drops the recorded runs; about 50 min; ``active_learning_classification_finding.*`` in the results):

    python benchmarks/active_learning_classification.py --seeds 4 --strategies random,cls_finding \
        --redo random,cls_entropy --resume benchmarks/results/active_learning_classification.json

Writes ``active_learning_classification.{json,md,png}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from active_learning import (
    CLS_STRATEGIES,
    at_labels,
    interval_text,
    parse_strategies,
    recorded,
    render_recorded,
    reproduction_text,
    resumed,
    study_arguments,
    study_seeds,
    train_steps,
    write_study,
)
from classification import generated_cases, pair_auc
from monai.data import CacheDataset
from monai.transforms import Compose

from labelloop_app.activelearning.classification import class_uncertainty
from labelloop_app.conf import ClassificationConf
from labelloop_app.detector import (
    DEFAULT_PATCH,
    PatchWindowInferer,
    evidence_probabilities,
    findings_datalist_item,
    fit_evidence_bias,
    image_evidence,
)
from labelloop_app.networks import classification_network
from labelloop_app.synthetic import class_label_document
from labelloop_app.train_detector import DetectorTrain

HERE = Path(__file__).resolve().parent
NAME = "active_learning_classification"


def build_cohort(folder: Path, kind: str, n: int, seed: int) -> List[Dict[str, Any]]:
    """Render ``n`` cases of the generator's ``kind`` cohort; each with its class index, findings and kind of
    lesion (``rare``: near the detection limit)."""
    cases = []
    for path, info in generated_cases(kind, n, folder, f"rendering {kind}", seed=seed, prefix=""):
        image_id = path.name[: -len(".nii.gz")]
        doc = class_label_document(info["class"], info)
        cases.append(
            {
                "id": image_id,
                "image": str(path),
                "class": info["class"],
                "label": int(info["class"] == "lesion"),
                "findings": doc["findings"],
                "rare": bool(info["near_limit"]),
                "lesion_radius_mm": info["lesion_radius_mm"],
                "contrast_hu": info["contrast_hu"],
            }
        )
    return cases


class DetectorTrainer:
    """The detector train task's transforms, loss, optimizer and learning-rate decay in a plain loop with a fixed
    step budget; evaluation and scoring as the ``classification`` infer task computes its result."""

    def __init__(self, conf: ClassificationConf, pool: List[Dict], heldout: List[Dict], workdir: Path, lr: float):
        self.conf, self.lr = conf, lr
        self.task = DetectorTrain(
            conf, model_dir=str(workdir / "train"), network=self.new_network(), publish_path=str(workdir / "m.pt")
        )
        ctx = SimpleNamespace(request={"learning_rate": lr, "patch": DEFAULT_PATCH}, network=None)
        items = [findings_datalist_item({"image": c["image"], "label": c["label"]}, c["findings"]) for c in pool]
        self.cases = {c["id"]: c for c in pool}
        self.index = {c["id"]: i for i, c in enumerate(pool)}
        self.train_ds = CacheDataset(items, Compose(self.task.train_pre_transforms(ctx)), progress=False)
        self.loss = self.task.loss_function(SimpleNamespace(request={}))
        self.inferer = PatchWindowInferer(DEFAULT_PATCH)
        volume = Compose(self.task._deterministic())
        self.images = {c["id"]: volume({"image": c["image"]})["image"] for c in [*pool, *heldout]}
        self.heldout = heldout

    def new_network(self) -> torch.nn.Module:
        return classification_network(self.conf.network, len(self.conf.classes))

    def train(self, network: torch.nn.Module, labeled: Sequence[str], steps: int, rng: random.Random) -> float:
        """``steps`` optimizer steps of ``batch_size`` patches, drawn from the labeled cases class by class in turn
        (as the server's balanced sampler draws them), then the evidence calibration on the labeled cases."""
        optimizer = self.task.optimizer(SimpleNamespace(request={"learning_rate": self.lr}, network=network))
        by_class = [[i for i in labeled if self.cases[i]["label"] == k] for k in (0, 1)]
        by_class = [ids for ids in by_class if ids]

        def draw() -> list:
            draws = [rng.choice(by_class[j % len(by_class)]) for j in range(self.conf.batch_size)]
            return [p for i in draws for p in _as_list(self.train_ds[self.index[i]])]

        t0 = time.time()
        train_steps(network, optimizer, self.loss, steps, draw)
        self.calibrate(network, labeled)
        return time.time() - t0

    def evidence(self, network: torch.nn.Module, image_id: str) -> torch.Tensor:
        network.eval()
        with torch.inference_mode():
            return image_evidence(self.inferer(self.images[image_id][None], network)[0])

    def calibrate(self, network: torch.nn.Module, labeled: Sequence[str]) -> None:
        """The server's :class:`EvidenceCalibration` fit, on the labeled cases."""
        evidence = np.array([float(self.evidence(network, i)[0]) for i in labeled])
        positive = np.array([self.cases[i]["label"] == 1 for i in labeled])
        if positive.any() and not positive.all():
            network.evidence_bias.fill_(fit_evidence_bias(evidence, positive))

    def probabilities(self, network: torch.nn.Module, image_id: str) -> np.ndarray:
        return evidence_probabilities(self.evidence(network, image_id), network.evidence_bias).numpy()

    def evaluate(self, network: torch.nn.Module) -> Dict[str, Any]:
        """Held-out ROC AUC of p(lesion): all lesions, near-limit lesions (``rare``) and the rest (``common``),
        each against every normal case; accuracy at p >= 0.5."""
        rows = [(c, float(self.probabilities(network, c["id"])[1])) for c in self.heldout]
        normal = [p for c, p in rows if c["label"] == 0]
        rare = [p for c, p in rows if c["label"] == 1 and c["rare"]]
        common = [p for c, p in rows if c["label"] == 1 and not c["rare"]]
        nan = float("nan")
        return {
            "auc": pair_auc(rare + common, normal),
            "auc_rare": pair_auc(rare, normal) if rare else nan,
            "auc_common": pair_auc(common, normal) if common else nan,
            "accuracy": float(np.mean([(p >= 0.5) == (c["label"] == 1) for c, p in rows])),
            "cases": [{"id": c["id"], "p_lesion": p} for c, p in rows],
        }


def _as_list(item) -> list:
    return item if isinstance(item, list) else [item]


class UncertaintyScorer:
    """The uncertainty the ``classification`` infer task reports, for :func:`active_learning.run`."""

    def __init__(self, trainer: DetectorTrainer):
        self.trainer = trainer

    def score(self, network: torch.nn.Module, image_id: str, embedding_only: bool = False) -> Dict[str, Any]:
        if embedding_only:  # labeled images: the cls_* strategies need nothing of them
            return {}
        p = self.trainer.probabilities(network, image_id)
        return class_uncertainty({"probabilities": p.tolist()})


def initial_cases(cases: Dict[str, Dict], n: int, rng: random.Random) -> List[str]:
    """``n`` random cases, half of them with a lesion (a first labeled set needs both classes)."""
    lesion = sorted(i for i, c in cases.items() if c["label"] == 1)
    normal = sorted(i for i, c in cases.items() if c["label"] == 0)
    return rng.sample(lesion, n // 2) + rng.sample(normal, n - n // 2)


def picked_kinds(by_seed: Dict[int, List[Dict]], cases: Dict[str, Dict]) -> Dict[str, float]:
    """What a strategy's picks were: the share with a lesion, near the limit, and hyperdense."""
    picks = [cases[p["id"]] for rows in by_seed.values() for row in rows for p in row.get("picked", [])]
    if not picks:
        return {}
    return {
        "lesion": float(np.mean([c["label"] == 1 for c in picks])),
        "near_limit": float(np.mean([c["rare"] for c in picks])),
        "hyperdense": float(np.mean([c["contrast_hu"] > 0 for c in picks])),
    }


def markdown(result: Dict[str, Any], image: str = f"{NAME}.png") -> str:
    """The study's report: its command, cohort, reference and one row per strategy, then the plot ``image``."""
    s, cfg = result["summary"], result["config"]
    lines = [
        "# Active-learning study for classification (simulated annotators)",
        "",
        f"`{result['command']}` on {result['machine']}, {result['minutes']:.0f} min.",
        "",
        *reproduction_text(result),
        f"Pool of {cfg['pool']} lesion phantoms ({cfg['pool_lesion']} with a lesion, {cfg['pool_rare']} of them near "
        f"the detection limit), {cfg['heldout']} held-out ({cfg['heldout_lesion']} with a lesion, "
        f"{cfg['heldout_rare']} near the limit). Network: the detector. Start: {cfg['initial']} labeled cases (half "
        f"with a lesion) and a model trained on them for {cfg['warmup_steps']} steps; each round fine-tunes "
        f"{cfg['steps']} steps of {cfg['batch_size']} patches, scores the pool and labels {cfg['batch']} more, up to "
        f"{cfg['max_labels']}. {len(cfg['seeds'])} seeds.",
        "",
        f"All-labels reference (same warm start and total steps on all {cfg['pool']} cases): held-out ROC AUC "
        f"**{s['reference_auc']:.3f}**; target = {s['fraction']:.0%} of it = {s['target_auc']:.3f}.",
        "",
        "| strategy | labels to reach the target | relative to random | 95% interval (seeds resampled) | per seed | "
        "mean AUC over rounds | final AUC | final AUC near the limit | picks with a lesion | near the limit | "
        "hyperdense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec=".1f", missing="not reached"):
        return missing if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for name, row in s["strategies"].items():
        last = row["labels"][-1]
        kinds = result["picked"].get(name, {})
        lines.append(
            f"| {name} | {fmt(row['labels_to_target'])} | {fmt(row['relative_to_random'], '.0%')} | "
            f"{interval_text(row.get('relative_to_random_interval'))} | "
            f"{', '.join(fmt(v, '.0f') for v in row['labels_to_target_per_seed'])} | "
            f"{fmt(row['mean_auc_over_rounds'], '.3f')} | "
            f"{at_labels(row['mean_auc'], last):.3f} +- {at_labels(row['std_auc'], last):.3f} | "
            f"{fmt(row['final_auc_rare'], '.3f', '-')} | {fmt(kinds.get('lesion'), '.0%', '-')} | "
            f"{fmt(kinds.get('near_limit'), '.0%', '-')} | {fmt(kinds.get('hyperdense'), '.0%', '-')} |"
        )
    lines += ["", f"![learning curves]({image})", "", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def write_results(args, argv, start, results, reference, pool, heldout, checks) -> Dict[str, Any]:
    """This study's results so far, with what each strategy picked."""
    config = {
        "pool_lesion": sum(c["label"] for c in pool),
        "pool_rare": sum(c["rare"] for c in pool),
        "heldout_lesion": sum(c["label"] for c in heldout),
        "heldout_rare": sum(c["rare"] for c in heldout),
    }
    cases = {c["id"]: c for c in pool}

    def picked(runs):
        return {"picked": {name: picked_kinds(by_seed, cases) for name, by_seed in runs.items()}}

    return write_study(
        NAME, args, argv, start, results, reference, pool, config, markdown, "auc", "held-out ROC AUC", picked, checks
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="random,cls_entropy")
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=4, help="patches per step (the task's cls_batch_size)")
    study_arguments(ap, initial=8, batch=8, max_labels=40, warmup_steps=600, steps=300, lr=DetectorTrain.default_lr)
    args = ap.parse_args(argv)
    if args.render:
        print(render_recorded(args.render, markdown, "held-out ROC AUC"))
        return 0
    strategies = parse_strategies(ap, args.strategies, CLS_STRATEGIES)

    torch.set_num_threads(args.threads)
    start = time.time()
    conf = ClassificationConf(network="detector", batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pool = build_cohort(work, "cls", args.pool, 2)
        heldout = build_cohort(work, "cls_heldout", args.heldout, 2)
        cases = {c["id"]: c for c in pool}
        trainer = DetectorTrainer(conf, pool, heldout, work, args.lr)
        scorer = UncertaintyScorer(trainer)
        print(f"cohort ready in {time.time() - start:.0f}s", flush=True)

        results, reference, start = resumed(args, strategies, start)
        checks: List[Dict] = recorded(args, "reproduction")  # read once: --out may be the resumed file
        images = {i: i for i in cases}  # run() hands the scorer an image per id; the trainer keeps the volumes
        study_seeds(
            trainer,
            scorer,
            images,
            cases,
            strategies,
            args,
            results,
            reference,
            initial=lambda seed: initial_cases(cases, args.initial, random.Random(seed)),
            save=lambda: write_results(args, argv, start, results, reference, pool, heldout, checks),
            metric="auc",
            checks=checks,
        )

    print(markdown(write_results(args, argv, start, results, reference, pool, heldout, checks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
