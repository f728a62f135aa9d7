"""Which held-out lesions could any observer see? The ideal observer's detectability of every lesion in the
classification benchmark's held-out set, computed from the generator's own noise model.

    python benchmarks/lesion_visibility.py --extra-heldout 56

This reads the held-out set of ``classification.py --extra-heldout 56``: the sample data's 24 cases and 56 generated
ones. For each lesion case, the generator renders the same torso with and without the lesion, with the same noise.
Their difference is the lesion's exact signal ``s`` as it appears in the image, after blur, partial volume and
rounding. The noise is the generator's own: white Gaussian noise, correlated in-plane, at the case's ``noise_hu``,
plus the rounding to integer HU. Its power spectrum ``P(f)`` is :func:`labelloop_app.synthetic.noise_power`.

The ideal observer knows the torso, the lesion's shape and the lesion's position (signal and background known
exactly). It prewhitens the noise and correlates with the signal, which gives the detectability
``d'^2 = sum_f |S(f)|^2 / P(f) / N``. It tells the image from its lesion-free twin with ROC AUC ``Phi(d' / sqrt(2))``.

No observer, human or network, does better on that pair. An observer that must also search the liver, and meet
other torsos, does worse. So the mean of these AUCs over the lesion cases is a ceiling on the held-out ROC AUC that
any classifier can reach on this set. The recorded detector runs' p(lesion) are shown beside each d' band.

Writes ``lesion_visibility.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk
from classification import pair_auc
from common import command, machine
from tqdm import tqdm

from labelloop_app.synthetic import cohort_plan, lesion_acquisition, make_lesion_phantom, noise_power

HERE = Path(__file__).resolve().parent
BANDS = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 5.0), (5.0, 10.0), (10.0, math.inf))
"""d' bands of the table: AUC Phi(d'/sqrt 2) is 0.50-0.76, 0.76-0.92, 0.92-0.98, 0.98-1.00 and above."""
RUNS = ("classification_detector_3.json", "classification_detector_4.json")
"""Recorded detector runs on this held-out set (``--extra-heldout 56``), shown beside the ceiling."""


def heldout_plan(extra: int) -> List[Dict[str, Any]]:
    """The classification benchmark's held-out cases: the sample data's 24 (generator seed 0) and ``extra`` more
    (seed 1, ids prefixed ``extra_``), with the benchmark's case ids."""
    plan = cohort_plan("cls_heldout", 24, seed=0)
    for case in cohort_plan("cls_heldout", extra, seed=1):
        plan.append({**case, "id": f"extra_{case['id']}"})
    return plan


def detectability(case: Dict[str, Any], margin: int = 8) -> Dict[str, Any]:
    """The ideal observer's d' for the lesion of ``case`` (a :func:`cohort_plan` entry with a lesion), and the
    lesion's truth."""
    args = {k: v for k, v in case.items() if k not in ("id", "lesion")}
    with_lesion, info = make_lesion_phantom(lesion=True, **args)
    without, _ = make_lesion_phantom(lesion=False, **args)
    s = sitk.GetArrayFromImage(with_lesion).astype(np.float64) - sitk.GetArrayFromImage(without).astype(np.float64)
    support = np.argwhere(s != 0)
    if not len(support):  # the lesion lies outside the field of view
        return {**_truth(case, info), "d_prime": 0.0, "d_prime_npw": 0.0, "signal_voxels": 0}
    lo = np.maximum(support.min(axis=0) - margin, 0)
    hi = np.minimum(support.max(axis=0) + margin + 1, s.shape)
    box = s[tuple(slice(a, b) for a, b in zip(lo, hi))]
    power = noise_power(box.shape, lesion_acquisition(**args))
    spectrum = np.abs(np.fft.fftn(box)) ** 2
    d2 = float((spectrum / power).sum() / box.size)
    npw = float(spectrum.sum() / math.sqrt((spectrum * power).sum() * box.size))
    return {
        **_truth(case, info),
        "d_prime": round(math.sqrt(d2), 3),
        "d_prime_npw": round(npw, 3),
        "signal_voxels": int(len(support)),
    }


def _truth(case: Dict[str, Any], info: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "case": case["id"],
        "lesion_radius_mm": info["lesion_radius_mm"],
        "contrast_hu": info["contrast_hu"],
        "near_limit": bool(info["near_limit"]),
        "noise_hu": info["noise_hu"],
        "spacing": info["spacing"],
    }


def ideal_auc(d_prime: float) -> float:
    """ROC AUC of the ideal observer between an image and its lesion-free twin: Phi(d' / sqrt 2)."""
    return 0.5 * (1.0 + math.erf(d_prime / 2.0))


def recorded_runs(names: Sequence[str], lesions: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """p(lesion) per case of each recorded detector run found in ``benchmarks/results`` whose held-out lesions are
    these (same ids and radii)."""
    runs = {}
    for name in names:
        path = HERE / "results" / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        cases = {c["case"]: c for c in data["cases"]}
        if all(
            abs(cases.get(r["case"], {}).get("lesion_radius_mm", -1) - r["lesion_radius_mm"]) < 1e-3 for r in lesions
        ):
            runs[name] = {"auc": data["heldout_auc"], "p": {i: c["p_lesion"] for i, c in cases.items()}}
    return runs


def band_rows(lesions: List[Dict], normals: Sequence[str], runs: Dict[str, Dict]) -> List[Dict[str, Any]]:
    """Per d' band: lesions, near-limit lesions, the ideal AUC and each recorded run's AUC against the normals."""
    rows = []
    for lo, hi in BANDS:
        inside = [r for r in lesions if lo <= r["d_prime"] < hi]
        if not inside:
            continue
        row: Dict[str, Any] = {
            "d_prime": [lo, hi],
            "lesions": len(inside),
            "near_limit": sum(r["near_limit"] for r in inside),
            "radius_mm": [min(r["lesion_radius_mm"] for r in inside), max(r["lesion_radius_mm"] for r in inside)],
            "ideal_auc": float(np.mean([r["ideal_auc"] for r in inside])),
            "npw_auc": float(np.mean([r["npw_auc"] for r in inside])),
        }
        for name, run in runs.items():
            row[name] = pair_auc([run["p"][r["case"]] for r in inside], [run["p"][c] for c in normals])
        rows.append(row)
    return rows


def markdown(result: Dict[str, Any]) -> str:
    names = list(result["runs"])
    lines = [
        "# Lesion visibility: the ideal observer on the classification held-out set",
        "",
        f"`{result['command']}` on {result['machine']}, {result['seconds']:.0f} s.",
        "",
        f"{result['lesions']} lesion cases of {result['cases']} held-out cases. For each, d' is the detectability of "
        "its lesion for the ideal observer that knows the torso, the lesion's shape and its position, against the "
        "generator's own noise. Phi(d'/sqrt 2) is that observer's AUC between the image and its lesion-free twin, "
        "and no observer does better. The mean over the lesions is a ceiling on any classifier's held-out AUC.",
        "",
        f"**Ceiling on the held-out ROC AUC: {result['ceiling_auc']:.3f}** (near-limit lesions "
        f"{result['ceiling_auc_near_limit']:.3f}, plain lesions {result['ceiling_auc_plain']:.3f}). The same "
        "observer without prewhitening (a matched filter that ignores the noise's correlation, a common model of "
        f"a human reader): {result['npw_auc']:.3f} (near-limit lesions {result['npw_auc_near_limit']:.3f}).",
        "",
        "| ideal d' | lesions | near the limit | radius (mm) | ideal AUC | matched filter AUC |"
        + "".join(f" detector {n.split('_')[-1].split('.')[0]} |" for n in names),
        "|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    for row in result["bands"]:
        lo, hi = row["d_prime"]
        span = f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">= {lo:g}"
        lines.append(
            f"| {span} | {row['lesions']} | {row['near_limit']} | {row['radius_mm'][0]:.1f}-{row['radius_mm'][1]:.1f}"
            f" | {row['ideal_auc']:.3f} | {row['npw_auc']:.3f} |" + "".join(f" {_fmt(row.get(n))} |" for n in names)
        )
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra-heldout", type=int, default=56, help="as classification.py --extra-heldout")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    start = time.time()
    plan = heldout_plan(args.extra_heldout)
    lesions = [detectability(c) for c in tqdm(plan, desc="lesion cases") if c["lesion"]]
    for r in lesions:
        r["ideal_auc"] = round(ideal_auc(r["d_prime"]), 4)
        r["npw_auc"] = round(ideal_auc(r["d_prime_npw"]), 4)
    normals = [c["id"] for c in plan if not c["lesion"]]
    runs = recorded_runs(RUNS, lesions)

    def ceiling(rows, key="ideal_auc"):
        return float(np.mean([r[key] for r in rows])) if rows else float("nan")

    result = {
        "command": command("lesion_visibility.py", argv),
        "machine": machine(),
        "seconds": time.time() - start,
        "cases": len(plan),
        "lesions": len(lesions),
        "ceiling_auc": ceiling(lesions),
        "ceiling_auc_near_limit": ceiling([r for r in lesions if r["near_limit"]]),
        "ceiling_auc_plain": ceiling([r for r in lesions if not r["near_limit"]]),
        "npw_auc": ceiling(lesions, "npw_auc"),
        "npw_auc_near_limit": ceiling([r for r in lesions if r["near_limit"]], "npw_auc"),
        "bands": band_rows(lesions, normals, runs),
        "runs": {name: run["auc"] for name, run in runs.items()},
        "per_lesion": sorted(lesions, key=lambda r: r["d_prime"]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lesion_visibility.json").write_text(json.dumps(result, indent=1))
    (args.out / "lesion_visibility.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
