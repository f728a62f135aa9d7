"""Segmentation metrics between two label maps, structure by structure, matched by name.

Used by ``labelloop evaluate`` to compare model output (the ``original`` tag) with corrected labels (``final``).
For every structure present in both label maps' ``{name: value}`` maps it reports:

* Dice (``monai.metrics.compute_dice``, the functional form of ``DiceMetric``);
* the 95th-percentile symmetric Hausdorff distance in millimetres (``monai.metrics.compute_hausdorff_distance``
  with the voxel spacing, so anisotropic voxels are measured correctly);
* the volumes in mL and their difference (prediction - reference) in mL and in % of the reference.

A structure absent from both maps is reported with empty metrics ("absent in both") and left out of the
summary; absent from one only, its Dice is 0 and its HD95 is undefined (empty). Nothing here needs Slicer;
numpy is imported eagerly, SimpleITK, torch/MONAI and matplotlib only by the functions that need them, so
``LabelLoopLib`` imports without them.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

CSV_FIELDS = ("image", "label", "dice", "hd95_mm", "ref_ml", "pred_ml", "vol_diff_ml", "vol_diff_pct", "note")


class EvaluationError(Exception):
    """The two label maps cannot be compared (unreadable, different grids) or a needed package is missing."""


@dataclass
class LabelScore:
    """The metrics of one structure in one image. ``nan`` means undefined (see the module docstring)."""

    image: str
    label: str
    dice: float
    hd95_mm: float
    ref_ml: float
    pred_ml: float
    note: str = ""

    @property
    def vol_diff_ml(self) -> float:
        return self.pred_ml - self.ref_ml

    @property
    def vol_diff_pct(self) -> float:
        return 100.0 * self.vol_diff_ml / self.ref_ml if self.ref_ml > 0 else math.nan

    @property
    def evaluated(self) -> bool:
        """Whether the structure is in at least one of the two label maps (so it counts in the summary)."""
        return self.note != "absent in both"

    def row(self) -> Dict[str, Any]:
        return {
            "image": self.image,
            "label": self.label,
            "dice": _fmt(self.dice, 4),
            "hd95_mm": _fmt(self.hd95_mm, 3),
            "ref_ml": _fmt(self.ref_ml, 3),
            "pred_ml": _fmt(self.pred_ml, 3),
            "vol_diff_ml": _fmt(self.vol_diff_ml, 3),
            "vol_diff_pct": _fmt(self.vol_diff_pct, 2),
            "note": self.note,
        }


def _fmt(value: float, digits: int) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def matched_labels(pred_labels: Mapping[str, int], ref_labels: Mapping[str, int]) -> List[Tuple[str, int, int]]:
    """``(name, value in prediction, value in reference)`` for every name in both maps, in reference order."""
    return [(name, int(pred_labels[name]), int(ref_labels[name])) for name in ref_labels if name in pred_labels]


def _crop_to_union(a: np.ndarray, b: np.ndarray, margin: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Both masks cropped to the bounding box of their union plus ``margin`` (metrics are unchanged)."""
    union = a | b
    if not union.any():
        return a[:0], b[:0]
    lo, hi = [], []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.nonzero(union.any(axis=other))[0]
        lo.append(max(int(idx[0]) - margin, 0))
        hi.append(min(int(idx[-1]) + margin + 1, union.shape[axis]))
    box = tuple(slice(low, high) for low, high in zip(lo, hi))
    return a[box], b[box]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Tuple[float, float]:
    """Dice and HD95 (mm) of two boolean masks on the same grid; ``spacing`` in mm along the array's axes.

    Both empty: (nan, nan). One empty: (0, nan).
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise EvaluationError(f"mask shapes differ: {pred.shape} != {ref.shape}")
    if len(spacing) != pred.ndim:
        raise EvaluationError(f"{len(spacing)} spacing values for a {pred.ndim}D mask")
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return math.nan, math.nan
    if not has_pred or not has_ref:
        return 0.0, math.nan
    p, r = _crop_to_union(pred, ref)
    yp = torch.from_numpy(np.ascontiguousarray(p))[None, None].float()
    yr = torch.from_numpy(np.ascontiguousarray(r))[None, None].float()
    dice = float(compute_dice(yp, yr, include_background=True, ignore_empty=False)[0, 0])
    hd95 = float(
        compute_hausdorff_distance(yp, yr, include_background=True, percentile=95, spacing=[float(s) for s in spacing])[
            0, 0
        ]
    )
    return dice, hd95


def score_arrays(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    pred_labels: Mapping[str, int],
    ref_labels: Optional[Mapping[str, int]] = None,
    image: str = "",
) -> List[LabelScore]:
    """Per-structure scores of two integer label maps on one grid, structures matched by name.

    ``pred_labels``/``ref_labels`` map names to the values used in each map (the same map when ``ref_labels`` is
    omitted). ``spacing`` is in mm along the arrays' axes (reverse SimpleITK's (x, y, z) for its (z, y, x) arrays).
    """
    ref_labels = pred_labels if ref_labels is None else ref_labels
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise EvaluationError(
            f"{image or 'label maps'}: shapes differ, prediction {pred.shape} != reference {ref.shape}"
        )
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    scores = []
    for name, pred_value, ref_value in matched_labels(pred_labels, ref_labels):
        p = pred == pred_value
        r = ref == ref_value
        dice, hd95 = binary_metrics(p, r, spacing)
        n_pred, n_ref = int(p.sum()), int(r.sum())
        note = ""
        if not n_pred and not n_ref:
            note = "absent in both"
        elif not n_pred:
            note = "missing in prediction"
        elif not n_ref:
            note = "not in reference"
        scores.append(LabelScore(image, name, dice, hd95, n_ref * voxel_ml, n_pred * voxel_ml, note))
    return scores


def read_label_map(path: str) -> Tuple[np.ndarray, Any]:
    """A label map file as a (z, y, x) integer array and its SimpleITK image (for the grid)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(os.fspath(path))
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise EvaluationError(f"cannot read {os.path.basename(path)!r}: {lines[-1] if lines else e}") from e
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"{os.path.basename(path)!r} is not a label map (several values per voxel)")
    return sitk.GetArrayFromImage(image), image


def grid_mismatches(a: Any, b: Any, tol: float = 1e-3) -> List[str]:
    """Differences between two SimpleITK images' grids (size, spacing, origin, direction)."""
    problems = []
    if tuple(a.GetSize()) != tuple(b.GetSize()):
        problems.append(f"size {b.GetSize()} != {a.GetSize()}")
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=1e-6):
        problems.append(f"spacing {b.GetSpacing()} != {a.GetSpacing()}")
    if not np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol):
        problems.append(f"origin {b.GetOrigin()} != {a.GetOrigin()}")
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        problems.append("direction differs")
    return problems


def score_files(
    pred_path: str,
    ref_path: str,
    pred_labels: Mapping[str, int],
    ref_labels: Optional[Mapping[str, int]] = None,
    image: str = "",
) -> List[LabelScore]:
    """:func:`score_arrays` of two label map files, which must lie on the same grid (spacing from the reference)."""
    pred, pred_image = read_label_map(pred_path)
    ref, ref_image = read_label_map(ref_path)
    problems = grid_mismatches(ref_image, pred_image)
    if problems:
        raise EvaluationError(f"{image or os.path.basename(pred_path)}: grids differ: " + "; ".join(problems))
    spacing = tuple(reversed(ref_image.GetSpacing()))  # SimpleITK arrays are (z, y, x)
    return score_arrays(pred, ref, spacing, pred_labels, ref_labels, image=image)


# ------------------------------------------------------------------------------------------------- reporting


def write_csv(scores: Iterable[LabelScore], path: str) -> str:
    """One row per image and structure (undefined values as empty cells)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for s in scores:
            writer.writerow(s.row())
    return path


def _finite(values: Iterable[float]) -> List[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def summarize(scores: Sequence[LabelScore]) -> Dict[str, Dict[str, Any]]:
    """Per structure (and ``"all"``): counts, mean/median/min Dice, mean/median/max HD95, mean |volume diff| %."""
    groups: Dict[str, List[LabelScore]] = {}
    for s in scores:
        if s.evaluated:
            groups.setdefault(s.label, []).append(s)
    groups["all"] = [s for s in scores if s.evaluated]
    out: Dict[str, Dict[str, Any]] = {}
    for name, group in groups.items():
        dice = _finite(s.dice for s in group)
        hd = _finite(s.hd95_mm for s in group)
        vol = _finite(abs(s.vol_diff_pct) for s in group)
        out[name] = {
            "n": len(group),
            "dice_mean": float(np.mean(dice)) if dice else math.nan,
            "dice_median": float(np.median(dice)) if dice else math.nan,
            "dice_min": float(np.min(dice)) if dice else math.nan,
            "hd95_mean": float(np.mean(hd)) if hd else math.nan,
            "hd95_median": float(np.median(hd)) if hd else math.nan,
            "hd95_max": float(np.max(hd)) if hd else math.nan,
            "hd95_undefined": len(group) - len(hd),
            "abs_vol_diff_pct_mean": float(np.mean(vol)) if vol else math.nan,
        }
    return out


def format_summary(scores: Sequence[LabelScore], worst: int = 3) -> str:
    """A table per structure (mean, median, worst) and the worst cases by Dice, for people. The HD95 figures are over
    the measurements where the structure is in both maps; ``no HD95`` counts the others (missed or invented), so a
    mean over one found structure is not read as a mean over all."""
    summary = summarize(scores)
    images = sorted({s.image for s in scores})

    def num(v: float, digits: int) -> str:
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"

    lines = [f"{len(images)} image(s), {sum(1 for s in scores if s.evaluated)} structure measurements"]
    lines.append(
        f"{'structure':<16} {'n':>4} {'Dice mean':>9} {'median':>7} {'min':>6} "
        f"{'HD95 mm mean':>12} {'median':>7} {'max':>7} {'no HD95':>7} {'|dVol| %':>9}"
    )
    for name, st in summary.items():
        lines.append(
            f"{name:<16} {st['n']:>4} {num(st['dice_mean'], 3):>9} {num(st['dice_median'], 3):>7} "
            f"{num(st['dice_min'], 3):>6} {num(st['hd95_mean'], 2):>12} {num(st['hd95_median'], 2):>7} "
            f"{num(st['hd95_max'], 2):>7} {st['hd95_undefined']:>7} {num(st['abs_vol_diff_pct_mean'], 1):>9}"
        )
    ranked = sorted((s for s in scores if s.evaluated and math.isfinite(s.dice)), key=lambda s: s.dice)[:worst]
    if ranked:
        lines.append("worst cases (lowest Dice):")
        for s in ranked:
            extra = f", HD95 {num(s.hd95_mm, 2)} mm" + (f" ({s.note})" if s.note else "")
            lines.append(f"  {s.image} {s.label}: Dice {s.dice:.3f}{extra}, volume {s.vol_diff_ml:+.2f} mL")
    return "\n".join(lines)


def box_plot(scores: Sequence[LabelScore], path: str, title: str = "") -> str:
    """Box plots of Dice and HD95 per structure in one PNG (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise EvaluationError("--plot needs matplotlib: pip install matplotlib") from e
    names = list(dict.fromkeys(s.label for s in scores if s.evaluated))
    if not names:
        raise EvaluationError("nothing to plot: no structure was present in any image")
    dice = [_finite(s.dice for s in scores if s.label == n and s.evaluated) for n in names]
    hd = [_finite(s.hd95_mm for s in scores if s.label == n and s.evaluated) for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(names) + 2.0), 4.2))
    for ax, values, ylabel in ((axes[0], dice, "Dice"), (axes[1], hd, "HD95 (mm)")):
        ax.boxplot([v if v else [math.nan] for v in values], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylim(0.0, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
