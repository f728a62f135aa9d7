"""Classification benchmark: train the lesion classifier from scratch within a fixed time budget, then score the
held-out lesion phantoms.

    python benchmarks/classification.py --minutes 15

Starts a real LabelLoop server (``--conf tasks classification``) over a temporary copy of the sample data's
classification studies in which every image carries its true class as a class label (tag ``class``), trains
``classification`` from scratch for ``--minutes``, classifies every ``classification_heldout`` image (plus
``--extra-heldout`` generated ones) through the server, uploaded as an unknown scan would be, and reports accuracy,
balanced accuracy and ROC AUC with a bootstrap 95% interval, the misclassified cases with their lesion radius and
contrast, and the sensitivity by lesion size. Writes
``classification.{json,md,png}`` to ``--out`` (default ``benchmarks/results``; the PNG is the learning curve).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import command, machine, train_with_progress, training_arguments, write_results
from tqdm import tqdm

from labelloop_app.class_labels import CLASS_EXT, CLASS_TAG, write_class_label
from labelloop_app.classification_metrics import classification_report
from labelloop_app.devserver import start_server, stop_server
from labelloop_app.synthetic import class_label_document, cohort_plan, generate_sample_data, make_lesion_phantom

HERE = Path(__file__).resolve().parent
SIZE_BINS = ((0.0, 5.0), (5.0, 10.0), (10.0, 100.0))
LESION_KINDS = (
    ("typical (8-20 mm, 25-60 HU)", lambda r: r["near_limit"] is False),
    ("typical, hypodense", lambda r: r["near_limit"] is False and r["contrast_hu"] < 0),
    ("typical, hyperdense", lambda r: r["near_limit"] is False and r["contrast_hu"] > 0),
    ("near the limit (3-8 mm, 10-25 HU)", lambda r: r["near_limit"] is True),
)


def _marked(case: dict) -> tuple:
    """The class and findings of a case's label, as an annotator who marks the lesion would store them."""
    doc = class_label_document(case["class"], case)
    return doc["class"], doc["findings"]


def prepare_studies(sample: Path, root: Path, extra: int = 0) -> Path:
    """Every classification study with its true class (and lesion as a finding) as a class label, plus ``extra``
    more generated cases (a cohort of the generator's own seed 1, independent of the sample data and of the
    held-out cases)."""
    studies = root / "studies"
    studies.mkdir(parents=True)
    truth = json.loads((sample / "classification_truth.json").read_text())
    for image_id, case in truth.items():
        shutil.copy(sample / "classification" / f"{image_id}.nii.gz", studies / f"{image_id}.nii.gz")
        write_class_label(str(studies / "labels" / CLASS_TAG / f"{image_id}{CLASS_EXT}"), *_marked(case))
    for path, info in generated_cases("cls", extra, studies, "extra training cases"):
        image_id = path.name[: -len(".nii.gz")]
        write_class_label(str(studies / "labels" / CLASS_TAG / f"{image_id}{CLASS_EXT}"), *_marked(info))
    return studies


def generated_cases(kind: str, n: int, folder: Path, desc: str, seed: int = 1, prefix: str = "extra_") -> list:
    """(image path, truth) of ``n`` cases of the generator's ``kind`` cohort with ``seed`` (by default 1, independent
    of the sample data), written to ``folder`` as ``<prefix><id>.nii.gz``."""
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for case in tqdm(cohort_plan(kind, n, seed=seed), desc=desc, disable=not n):
        path = folder / f"{prefix}{case.pop('id')}.nii.gz"
        image, info = make_lesion_phantom(**case)
        sitk.WriteImage(image, str(path), useCompression=True)
        cases.append((path, info))
    return cases


def pair_auc(positives: list, negatives: list):
    """P(a positive scores above a negative), ties counted half; None when either side is empty."""
    if len(positives) == 0 or len(negatives) == 0:
        return None
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def auc_interval(positives: list, negatives: list, draws: int = 2000, seed: int = 0):
    """Bootstrap 95% interval of :func:`pair_auc` (cases resampled within each class); None when undefined."""
    if len(positives) == 0 or len(negatives) == 0:
        return None
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(positives), np.asarray(negatives)
    aucs = [pair_auc(rng.choice(pos, pos.size), rng.choice(neg, neg.size)) for _ in range(draws)]
    return [round(float(v), 3) for v in np.percentile(aucs, [2.5, 97.5])]


def auc_postfix(entry: dict) -> dict:
    return {"loss": f"{entry['loss']:.3f}", "val_auc": entry.get("val_auc")}


def heldout_cases(sample: Path, root: Path, extra: int = 0) -> list:
    """(image path, truth) of every held-out case: the sample data's, plus ``extra`` generated ones (a held-out
    cohort of the generator's seed 1, independent of the sample data and of the extra training cases)."""
    truth = json.loads((sample / "classification_heldout" / "truth.json").read_text())
    cases = [(sample / "classification_heldout" / "images" / f"{i}.nii.gz", c) for i, c in sorted(truth.items())]
    return cases + generated_cases("cls_heldout", extra, root / "heldout", "extra held-out cases")


def evaluate(server, cases: list) -> list:
    rows = []
    for image, case in tqdm(cases, desc="held-out inference"):
        image_id = image.name[: -len(".nii.gz")]
        t0 = time.time()
        with open(image, "rb") as f:
            r = server.post("/infer/classification?output=json", files={"file": (image.name, f)})
        r.raise_for_status()
        result = r.json()
        rows.append(
            {
                "case": image_id,
                "true": case["class"],
                "predicted": result["class"],
                "p_lesion": result["probabilities"]["lesion"],  # unrounded: rounding ties saturated scores
                "lesion_radius_mm": case["lesion_radius_mm"],
                "contrast_hu": case["contrast_hu"],
                "near_limit": case.get("near_limit"),
                "seconds": round(time.time() - t0, 2),
            }
        )
    return rows


def plot(stats: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = stats["history"]
    t = np.cumsum([h["seconds"] for h in history]) / 60.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("val_auc", "k-"), ("val_balanced_accuracy", "b-"), ("train_balanced_accuracy", "b:")):
        ax.plot(t, [h.get(key) if h.get(key) is not None else np.nan for h in history], style, label=key)
    ax2 = ax.twinx()
    ax2.plot(t, [h["loss"] for h in history], "r-", alpha=0.4, label="train loss")
    ax2.set_ylabel("train loss", color="r")
    ax.set_xlabel("training time (min)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"LabelLoop {stats['network']} classifier from scratch ({stats['train_images']} train images)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(ap, HERE)
    ap.add_argument("--extra-train", type=int, default=0, help="generated training cases beyond the sample data's")
    ap.add_argument("--extra-heldout", type=int, default=0, help="generated held-out cases beyond the sample data's")
    ap.add_argument("--save-model", type=Path, help="keep the trained model")
    args = ap.parse_args(argv)

    generate_sample_data(args.sample_data)
    args.out.mkdir(parents=True, exist_ok=True)
    conf = {"tasks": "classification", "auto_scoring": "false", **dict(args.conf)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studies = prepare_studies(args.sample_data, root, args.extra_train)
        heldout = heldout_cases(args.sample_data, root, args.extra_heldout)
        server = start_server(studies, root / "models", root / "server.log", conf)
        try:
            classes = server.info()["models"]["classification"]["config"]["classes"]
            params = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
            stats = train_with_progress(server, "classification", args.minutes, params, auc_postfix)
            rows = evaluate(server, heldout)
            if args.save_model:
                shutil.copy(next((root / "models").glob("classification_*.pt")), args.save_model)
        finally:
            stop_server(server)

    index = {c: i for i, c in enumerate(classes)}
    probs = np.array([[1.0 - r["p_lesion"], r["p_lesion"]] for r in rows])
    report = classification_report(probs, np.array([index[r["true"]] for r in rows]), classes)
    wrong = [r for r in rows if r["predicted"] != r["true"]]
    by_size = []
    for lo, hi in SIZE_BINS:
        cases = [r for r in rows if r["true"] == "lesion" and lo <= r["lesion_radius_mm"] < hi]
        found = sum(r["predicted"] == "lesion" for r in cases)
        by_size.append({"radius_mm": [lo, hi], "lesions": len(cases), "detected": found})
    by_kind = []
    for kind, selected in LESION_KINDS:
        cases = [r for r in rows if r["true"] == "lesion" and selected(r)]
        positives = [r["p_lesion"] for r in cases]
        negatives = [r["p_lesion"] for r in rows if r["true"] != "lesion"]
        kind_auc = pair_auc(positives, negatives)
        found = sum(r["predicted"] == "lesion" for r in cases)
        by_kind.append({"lesions": kind, "cases": len(cases), "detected": found, "auc_vs_normal": kind_auc})
    interval = auc_interval(
        [r["p_lesion"] for r in rows if r["true"] == "lesion"], [r["p_lesion"] for r in rows if r["true"] != "lesion"]
    )
    best = max(stats["history"], key=lambda h: h.get("val_auc") or 0.0)
    result = {
        "command": command("classification.py", argv),
        "machine": machine(),
        "budget_minutes": args.minutes,
        "network": stats["network"],
        "epochs": stats["epoch"],
        "train_images": stats["train_images"],
        "val_images": stats["val_images"],
        "class_counts": stats["class_counts"],
        "best_val_auc": best.get("val_auc"),
        "heldout_cases": len(rows),
        "heldout_accuracy": report["accuracy"],
        "heldout_balanced_accuracy": report["balanced_accuracy"],
        "heldout_auc": report["auc"],
        "heldout_auc_95ci": interval,
        "heldout_confusion_matrix": report["confusion_matrix"],
        "heldout_sensitivity": report["sensitivity"],
        "heldout_specificity": report["specificity"],
        "lesion_sensitivity_by_radius": by_size,
        "lesion_kinds": by_kind,
        "misclassified": wrong,
        "cases": rows,
    }
    plot(stats, args.out / "classification.png")
    auc = report["auc"]
    lines = [
        "# Classification benchmark",
        "",
        f"`{result['command']}` on {result['machine']}: {args.minutes:g} min from scratch, {stats['epoch']} epochs "
        f"of {stats['network']}, {stats['train_images']} training / {stats['val_images']} validation images "
        f"({', '.join(f'{k}: {v}' for k, v in stats['class_counts'].items())}).",
        "",
        f"Held-out ({len(rows)} cases): accuracy **{report['accuracy']:.3f}**, balanced accuracy "
        f"**{report['balanced_accuracy']:.3f}**, ROC AUC **{auc:.3f}** (bootstrap 95% interval "
        f"{interval[0]:.3f}-{interval[1]:.3f}; target >= 0.95)."
        if auc is not None
        else f"Held-out ({len(rows)} cases): accuracy {report['accuracy']:.3f} (one class only: no AUC).",
        "",
        "| lesion radius (mm) | lesions | detected |",
        "|---|---|---|",
        *[f"| {b['radius_mm'][0]:g}-{b['radius_mm'][1]:g} | {b['lesions']} | {b['detected']} |" for b in by_size],
        "",
        "| lesions | cases | detected | ROC AUC against the normal cases |",
        "|---|---|---|---|",
        *[
            f"| {k['lesions']} | {k['cases']} | {k['detected']} | "
            f"{'-' if k['auc_vs_normal'] is None else format(k['auc_vs_normal'], '.3f')} |"
            for k in by_kind
        ],
        "",
        "Misclassified:" if wrong else "No case misclassified.",
        "",
    ]
    if wrong:
        lines += [
            "| case | true | predicted | p(lesion) | lesion radius (mm) | contrast (HU) |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r['case']} | {r['true']} | {r['predicted']} | {r['p_lesion']:.3f} | {r['lesion_radius_mm']:g} "
                f"| {r['contrast_hu']:g} |"
                for r in wrong
            ],
            "",
        ]
    lines.append("![learning curve](classification.png)")
    write_results(args.out, "classification", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
