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

The searching observers (:class:`SearchingObserver`) still know the torso, but not whether, where or how large a
lesion is: they scan prewhitening matched filters for balls of 3-20 mm over the liver. ``scan`` rates an image by
the largest response, ``bayes`` by the likelihood ratio under the generator's lesion prior (the best possible rating
if the lesions were exactly its balls). Both rate fresh draws of each case's noise (``--search-draws``), and every
lesion case's ratings are compared with every normal case's. Their AUCs measure what the search alone costs.

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

from labelloop_app.synthetic import (
    NEAR_LIMIT_FRACTION,
    acquisition_blur,
    acquisition_noise,
    cohort_plan,
    lesion_acquisition,
    lesion_phantom_liver,
    make_lesion_phantom,
    noise_power,
)

HERE = Path(__file__).resolve().parent
BANDS = ((0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 5.0), (5.0, 10.0), (10.0, math.inf))
"""d' bands of the table: AUC Phi(d'/sqrt 2) is 0.50-0.76, 0.76-0.92, 0.92-0.98, 0.98-1.00 and above."""
RUNS = tuple(f"classification_detector_{n}.json" for n in range(3, 11))
"""Recorded detector runs on this held-out set (``--extra-heldout 56``), shown beside the ceiling."""


def heldout_plan(extra: int) -> List[Dict[str, Any]]:
    """The classification benchmark's held-out cases: the sample data's 24 (generator seed 0) and ``extra`` more
    (seed 1, ids prefixed ``extra_``), with the benchmark's case ids."""
    plan = cohort_plan("cls_heldout", 24, seed=0)
    for case in cohort_plan("cls_heldout", extra, seed=1):
        plan.append({**case, "id": f"extra_{case['id']}"})
    return plan


def phantom_args(case: Dict[str, Any]) -> Dict[str, Any]:
    """The :func:`make_lesion_phantom` keywords of a :func:`cohort_plan` entry (its own ``lesion`` flag aside)."""
    return {k: v for k, v in case.items() if k not in ("id", "lesion")}


def lesion_signal(case: Dict[str, Any]):
    """The lesion of ``case`` as it appears in the image (numpy order, HU): the case minus its lesion-free twin,
    rendered with the same noise; and the lesion's truth."""
    args = phantom_args(case)
    with_lesion, info = make_lesion_phantom(lesion=True, **args)
    without, _ = make_lesion_phantom(lesion=False, **args)
    s = sitk.GetArrayFromImage(with_lesion).astype(np.float64) - sitk.GetArrayFromImage(without).astype(np.float64)
    return s, info


def detectability(case: Dict[str, Any], s: np.ndarray, info: Dict[str, Any], margin: int = 8) -> Dict[str, Any]:
    """The ideal observer's d' for the lesion ``s`` of ``case`` (a :func:`cohort_plan` entry with a lesion, see
    :func:`lesion_signal`), and the lesion's truth."""
    args = phantom_args(case)
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


OBSERVERS = ("bayes", "scan")
SEARCH_RADII_MM = (3.0, 4.0, 5.5, 8.0, 11.0, 15.0, 20.0)
"""Lesion sizes the searching observers look for: the generator's radii, 3-20 mm, about 1.4x apart."""


def lesion_prior() -> List[tuple]:
    """The generator's lesions as (radius index in ``SEARCH_RADII_MM``, contrast in HU, prior weight): near the
    limit (``NEAR_LIMIT_FRACTION``) 3-8 mm and 10-25 HU, otherwise 8-20 mm and 25-60 HU; 70% hypodense. Radii are
    drawn log-uniformly, so the grid's radii are weighted alike; contrasts on four even steps of their range."""
    prior = []
    for fraction, radii, (lo, hi) in (
        (NEAR_LIMIT_FRACTION, (3.0, 4.0, 5.5, 8.0), (10.0, 25.0)),
        (1.0 - NEAR_LIMIT_FRACTION, (8.0, 11.0, 15.0, 20.0), (25.0, 60.0)),
    ):
        for radius in radii:
            for magnitude in np.linspace(lo, hi, 4):
                for sign, p_sign in ((-1.0, 0.7), (1.0, 0.3)):
                    weight = fraction * p_sign / (len(radii) * 4)
                    prior.append((SEARCH_RADII_MM.index(radius), sign * float(magnitude), weight))
    return prior


def ball_template(shape: Sequence[int], spacing: Sequence[float], radius_mm: float, acq: Dict) -> np.ndarray:
    """A ball of unit contrast and ``radius_mm`` (numpy order, FFT layout: centred on voxel 0), blurred as the
    acquisition blurs the torso; a one-voxel soft edge stands in for partial volume."""
    axes = [(np.arange(n) - n // 2) * h for n, h in zip(shape, spacing)]
    dist = np.sqrt(sum(a**2 for a in np.meshgrid(*axes, indexing="ij", sparse=True)))
    ball = np.clip((radius_mm - dist) / float(np.mean(spacing)) + 0.5, 0.0, 1.0).astype(np.float32)
    return np.fft.ifftshift(acquisition_blur(ball, acq).astype(np.float64))


class SearchingObserver:
    """Observers that know the torso and where the liver is, but not whether, where or how large a lesion is: the
    search that the ideal observer of :func:`detectability` is spared. They see the image minus its noise-free,
    lesion-free background (the lesion, if any, plus noise), through prewhitening matched filters for a ball of every
    size in ``SEARCH_RADII_MM`` at every liver voxel; ``z`` is a filter's response in units of its standard deviation
    under noise alone.

    ``scan`` rates an image by its largest ``|z|`` over sizes and liver voxels (either polarity). ``bayes`` is the
    likelihood ratio of "a lesion of the generator's prior (:func:`lesion_prior`), anywhere in the liver" against
    "noise alone": for a ball ``t`` of contrast ``c`` at ``x`` the log ratio is ``c n z(x) - (c n)^2 / 2`` with
    ``n`` the ball's prewhitened norm, averaged over liver voxels and the prior. Were the lesions exactly its balls,
    no observer would rank images better; the generator's are rotated ellipsoids with their own edges, so it is a
    strong observer, not a ceiling (on the held-out set it scores a little below ``scan``).
    """

    def __init__(self, liver: sitk.Image, acq: Dict[str, Any]):
        self.liver = sitk.GetArrayFromImage(liver).astype(bool)
        self.shape, self.acq = self.liver.shape, acq
        spacing = liver.GetSpacing()[::-1]
        power = noise_power(self.shape, acq)
        half = self.shape[-1] // 2 + 1  # the rfftn half of the spectrum
        self.filters, self.norms = [], []
        for radius in SEARCH_RADII_MM:
            t = np.fft.fftn(ball_template(self.shape, spacing, radius, acq))
            norm = math.sqrt(float((np.abs(t) ** 2 / power).sum() / t.size))
            self.filters.append((np.conj(t) / power / norm)[..., :half])
            self.norms.append(norm)
        self.prior = lesion_prior()

    def responses(self, field: np.ndarray) -> List[np.ndarray]:
        """Each filter's ``z`` at every liver voxel of ``field`` (numpy order, the case's grid)."""
        g = np.fft.rfftn(field)
        return [np.fft.irfftn(f * g, s=self.shape, axes=(0, 1, 2))[self.liver] for f in self.filters]

    def rate(self, field: np.ndarray) -> Dict[str, float]:
        z = self.responses(field)
        terms = []
        for k, contrast, weight in self.prior:
            a = contrast * self.norms[k]
            log_lr = a * z[k] - 0.5 * a * a
            top = float(log_lr.max())
            terms.append(math.log(weight) + top + math.log(float(np.exp(log_lr - top).mean())))
        top = max(terms)
        return {
            "scan": max(float(np.abs(r).max()) for r in z),
            "bayes": top + math.log(sum(math.exp(t - top) for t in terms)),
        }

    def ratings(self, signal: Optional[np.ndarray], draws: int, seed: int) -> List[Dict[str, float]]:
        """Both observers' ratings of ``draws`` images: ``signal`` (or nothing) plus fresh noise of the case's
        acquisition."""
        rng = np.random.default_rng(seed)
        base = 0.0 if signal is None else signal
        return [self.rate(base + acquisition_noise(self.shape, self.acq, rng)) for _ in range(draws)]


def search_ratings(case: Dict[str, Any], draws: int, signal: Optional[np.ndarray] = None) -> List[Dict[str, float]]:
    """The searching observers' ratings of ``draws`` noise draws of ``case`` (with its lesion ``signal``, if any)."""
    args = phantom_args(case)
    observer = SearchingObserver(lesion_phantom_liver(**args), lesion_acquisition(**args))
    return observer.ratings(signal, draws, seed=int(case["seed"]))


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
            **{f"{o}_auc": float(np.mean([r[f"{o}_auc"] for r in inside])) for o in OBSERVERS},
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
        f"**Observers that must search: {result['bayes_auc']:.3f}** for the likelihood ratio (near-limit lesions "
        f"{result['bayes_auc_near_limit']:.3f}, plain lesions {result['bayes_auc_plain']:.3f}), "
        f"{result['scan_auc']:.3f} for the largest matched-filter response (near-limit lesions "
        f"{result['scan_auc_near_limit']:.3f}). These observers know the torso and the liver but not whether, where "
        "or how large a lesion is. Prewhitening matched filters for balls of "
        f"{', '.join(f'{r:g}' for r in result['search_radii_mm'])} mm are scanned over every liver voxel. *scan* "
        "rates an image by the largest response (in units of its noise standard deviation, either polarity); "
        "*bayes* by the likelihood ratio of a lesion drawn from the generator's prior (size, contrast, polarity), "
        "anywhere in the liver, against noise alone: no rating would be better if the lesions were exactly its balls, "
        "but they are rotated ellipsoids with their own edges, so neither observer is an exact ceiling. Each case is "
        "rated on "
        f"{result['search_draws']} fresh draws of its acquisition's noise, and each lesion case's AUC is taken "
        "against the ratings of every normal case. Vessels and other look-alikes are part of the known torso, so "
        "they never fool these observers: a network's task is harder still.",
        "",
        "| ideal d' | lesions | near the limit | radius (mm) | ideal AUC | matched filter AUC | bayes AUC | scan AUC |"
        + "".join(f" detector {n.split('_')[-1].split('.')[0]} |" for n in names),
        "|---|---|---|---|---|---|---|---|" + "---|" * len(names),
    ]
    for row in result["bands"]:
        lo, hi = row["d_prime"]
        span = f"{lo:g}-{hi:g}" if math.isfinite(hi) else f">= {lo:g}"
        lines.append(
            f"| {span} | {row['lesions']} | {row['near_limit']} | {row['radius_mm'][0]:.1f}-{row['radius_mm'][1]:.1f}"
            f" | {row['ideal_auc']:.3f} | {row['npw_auc']:.3f} | {row['bayes_auc']:.3f} | {row['scan_auc']:.3f} |"
            + "".join(f" {_fmt(row.get(n))} |" for n in names)
        )
    lines += ["", *result.get("notes", [])]
    return "\n".join(lines) + "\n"


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extra-heldout", type=int, default=56, help="as classification.py --extra-heldout")
    ap.add_argument("--search-draws", type=int, default=4, help="noise draws per case for the searching observer")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    start = time.time()
    plan = heldout_plan(args.extra_heldout)
    lesions, normal_ratings = [], {}
    for case in tqdm(plan, desc="held-out cases"):
        if not case["lesion"]:
            normal_ratings[case["id"]] = search_ratings(case, args.search_draws)
            continue
        s, info = lesion_signal(case)
        r = detectability(case, s, info)
        r["ideal_auc"] = round(ideal_auc(r["d_prime"]), 4)
        r["npw_auc"] = round(ideal_auc(r["d_prime_npw"]), 4)
        r["search_ratings"] = search_ratings(case, args.search_draws, s)
        lesions.append(r)
    normals = list(normal_ratings)
    for o in OBSERVERS:
        without = [v[o] for ratings in normal_ratings.values() for v in ratings]
        for r in lesions:
            r[f"{o}_auc"] = pair_auc([v[o] for v in r["search_ratings"]], without)
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
        "search_draws": args.search_draws,
        "search_radii_mm": list(SEARCH_RADII_MM),
        **{
            f"{o}_auc{part}": ceiling([r for r in lesions if keep(r)], f"{o}_auc")
            for o in OBSERVERS
            for part, keep in (
                ("", lambda r: True),
                ("_near_limit", lambda r: r["near_limit"]),
                ("_plain", lambda r: not r["near_limit"]),
            )
        },
        "search_normal_ratings": normal_ratings,
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
