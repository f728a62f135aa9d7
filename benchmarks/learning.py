"""Learning benchmark: train from scratch on CPU within a fixed time budget, then score held-out phantoms.

    python benchmarks/learning.py --minutes 15

Starts a real LabelLoop server over a temporary copy of the sample studies in which every image carries its
ground-truth ``final`` label, trains ``segmentation`` from scratch for ``--minutes``, infers every held-out
case through the server and reports per-label Dice at the input resolution. Writes
``benchmarks/results/learning.{json,md,png}`` (the PNG is the learning curve from the train stats).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import command, machine, train_with_progress, training_arguments, write_results
from tqdm import tqdm

from labelloop_app.devserver import start_server, stop_server
from labelloop_app.synthetic import generate_sample_data

HERE = Path(__file__).resolve().parent


def dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    p, r = pred == value, ref == value
    denom = p.sum() + r.sum()
    return float("nan") if denom == 0 else 2.0 * float(np.logical_and(p, r).sum()) / float(denom)


def prepare_studies(sample: Path, root: Path) -> Path:
    studies = root / "studies"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    for image in sorted((sample / "segmentation").glob("*.nii.gz")):
        shutil.copy(image, studies / image.name)
        shutil.copy(sample / "segmentation_truth" / image.name, final / image.name)
    return studies


def dice_postfix(entry: dict) -> dict:
    return {"val_dice": f"{entry.get('val_mean_dice') or 0:.3f}"}


def evaluate(server, sample: Path, labels: dict) -> list:
    rows = []
    images = sorted((sample / "segmentation_heldout" / "images").glob("*.nii.gz"))
    for image in tqdm(images, desc="held-out inference"):
        t0 = time.time()
        with open(image, "rb") as f:
            r = server.post("/infer/segmentation?output=image", files={"file": (image.name, f)})
        r.raise_for_status()
        seconds = time.time() - t0
        with tempfile.NamedTemporaryFile(suffix=".nii.gz") as tmp:
            tmp.write(r.content)
            tmp.flush()
            pred = sitk.GetArrayFromImage(sitk.ReadImage(tmp.name))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(sample / "segmentation_heldout" / "labels" / image.name)))
        rows.append(
            {"case": image.name, "seconds": round(seconds, 2), **{n: dice(pred, ref, v) for n, v in labels.items()}}
        )
    return rows


def plot(stats: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = stats["history"]
    t = np.cumsum([h["seconds"] for h in history]) / 60.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in stats["labels"]:
        ax.plot(t, [h.get("val_dice", {}).get(name) for h in history], label=name, alpha=0.7)
    ax.plot(t, [h.get("val_mean_dice") for h in history], "k-", lw=2, label="mean")
    ax.set_xlabel("training time (min)")
    ax.set_ylabel("validation Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"LabelLoop {stats['network']} from scratch on CPU ({stats['train_images']} train images)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(ap, HERE)
    ap.add_argument("--save-model", type=Path, help="keep the trained model (for batch_throughput.py --model)")
    args = ap.parse_args(argv)

    generate_sample_data(args.sample_data)
    args.out.mkdir(parents=True, exist_ok=True)
    conf = dict(args.conf)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        studies = prepare_studies(args.sample_data, root)
        server = start_server(studies, root / "models", root / "server.log", conf)
        try:
            labels = server.info()["labels"]
            params = {} if args.learning_rate is None else {"learning_rate": args.learning_rate}
            stats = train_with_progress(server, "segmentation", args.minutes, params, dice_postfix)
            rows = evaluate(server, args.sample_data, labels)
            if args.save_model:
                shutil.copy(next((root / "models").glob("segmentation_*.pt")), args.save_model)
        finally:
            stop_server(server)

    per_label = {n: float(np.nanmean([r[n] for r in rows])) for n in labels}
    result = {
        "command": command("learning.py", argv),
        "machine": machine(),
        "budget_minutes": args.minutes,
        "epochs": stats["epoch"],
        "train_images": stats["train_images"],
        "val_images": stats["val_images"],
        "best_val_mean_dice": stats.get("best_metric"),
        "heldout_cases": len(rows),
        "heldout_dice_per_label": per_label,
        "heldout_mean_dice": float(np.mean(list(per_label.values()))),
        "cases": rows,
        "network": stats["network"],
    }
    plot(stats, args.out / "learning.png")
    lines = [
        "# Learning benchmark",
        "",
        f"`{result['command']}` on {result['machine']}: {args.minutes:g} min from scratch, "
        f"{stats['epoch']} epochs, {stats['train_images']} training / {stats['val_images']} validation images.",
        "",
        "| structure | held-out Dice |",
        "|---|---|",
        *[f"| {n} | {v:.3f} |" for n, v in per_label.items()],
        f"| **mean** | **{result['heldout_mean_dice']:.3f}** |",
        "",
        "![learning curve](learning.png)",
    ]
    write_results(args.out, "learning", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
