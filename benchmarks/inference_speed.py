"""Inference speed and memory: one multi-organ inference through a real server, wall time and peak RSS.

    python benchmarks/inference_speed.py

Cases: a synthetic 512 x 512 x 200 CT at 0.8 x 0.8 x 2.5 mm, and the real CT under ``../shared/realdata``
(when present). The server is fresh for each case so the peak resident memory (VmHWM of the server process)
belongs to that case. Weights come from ``--model`` (a published ``segmentation_<network>.pt``) or, if none
is given, from a one-epoch training on a few phantoms (speed does not depend on the weights' values).
Writes ``benchmarks/results/inference_speed.{json,md}``.
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
from common import command, machine, write_results

from labelloop_app.devserver import peak_rss_mb, start_server, stop_server
from labelloop_app.synthetic import make_phantom

HERE = Path(__file__).resolve().parent
REALDATA = HERE.parent.parent / "shared" / "realdata"


def bootstrap_model(root: Path, conf: dict) -> Path:
    """A published model from one short training on four small phantoms."""
    studies = root / "boot"
    final = studies / "labels" / "final"
    final.mkdir(parents=True)
    for i in range(4):
        image, label = make_phantom(500 + i, size=(96, 96, 40), spacing=(3.0, 3.0, 5.0))
        sitk.WriteImage(image, str(studies / f"b{i}.nii.gz"))
        sitk.WriteImage(label, str(final / f"b{i}.nii.gz"))
    models = root / "boot_models"
    server = start_server(studies, models, root / "boot.log", conf)
    try:
        server.train({"max_epochs": 1})
    finally:
        stop_server(server)
    return next(models.glob("segmentation_*.pt"))


def big_ct(root: Path) -> Path:
    image, _ = make_phantom(4242, size=(512, 512, 200), spacing=(0.8, 0.8, 2.5), orientation="LPS")
    path = root / "ct_512x512x200.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def measure(case: Path, model: Path, root: Path, conf: dict, repeats: int) -> dict:
    models = root / f"models_{case.stem}"
    models.mkdir()
    shutil.copy(model, models / model.name)
    studies = root / f"studies_{case.stem}"
    studies.mkdir()
    server = start_server(studies, models, root / f"{case.stem}.log", conf)
    try:
        idle_mb = peak_rss_mb(server.process.pid)
        times, latencies = [], []
        for _ in range(repeats):
            t0 = time.time()
            with open(case, "rb") as f:
                r = server.post("/infer/segmentation?output=all", files={"file": (case.name, f)}, data={"params": "{}"})
            r.raise_for_status()
            times.append(time.time() - t0)
        r = server.post(
            "/infer/segmentation?output=json", files={"file": (case.name, open(case, "rb"))}, data={"params": "{}"}
        )
        latencies = r.json().get("latencies", {})
        peak_mb = peak_rss_mb(server.process.pid)
    finally:
        stop_server(server)
    size = sitk.ImageFileReader()
    size.SetFileName(str(case))
    size.ReadImageInformation()
    return {
        "case": case.name,
        "size": list(size.GetSize()),
        "spacing": [round(s, 3) for s in size.GetSpacing()],
        "wall_seconds": [round(t, 2) for t in times],
        "wall_seconds_median": round(float(np.median(times)), 2),
        "server_idle_rss_mb": round(idle_mb),
        "server_peak_rss_mb": round(peak_mb),
        "server_latencies": latencies,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="published segmentation_<network>.pt to serve")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="server --conf")
    args = ap.parse_args(argv)
    conf = dict(args.conf)
    args.out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model or bootstrap_model(root, conf)
        cases = [big_ct(root)]
        real = REALDATA / "totalsegmentator" / "example_ct.nii.gz"
        if real.exists():
            cases.append(real)
        rows = [measure(c, model, root, conf, args.repeats) for c in cases]

    result = {
        "command": command("inference_speed.py", argv),
        "machine": machine(),
        "targets": {"wall_seconds": 30, "peak_rss_mb": 4096},
        "cases": rows,
    }
    lines = [
        "# Inference speed and memory",
        "",
        f"`{result['command']}` on {result['machine']}. Wall time is the HTTP round trip of one `/infer` "
        "(upload, inference, label map download); peak is the server process's VmHWM.",
        "",
        "| case | size | spacing (mm) | wall s (median) | server peak RSS (MB) | idle RSS (MB) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['case']} | {'x'.join(map(str, r['size']))} | {'x'.join(map(str, r['spacing']))} | "
            f"{r['wall_seconds_median']} | {r['server_peak_rss_mb']} | {r['server_idle_rss_mb']} |"
            for r in rows
        ],
        "",
        "Target: at most 30 s and 4 GB peak per inference on a 2-core CPU.",
    ]
    write_results(args.out, "inference_speed", result, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
