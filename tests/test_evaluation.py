"""The metric module behind ``labelloop evaluate``, on masks whose Dice, HD95 and volumes are known by construction.

Two n-voxel cubes offset by k voxels along one axis: the overlap is n*n*(n-k) voxels, so Dice = (n - k) / n.
Every surface voxel of one cube is at most k voxels (along the offset axis) from the other cube's surface, and the
whole face opposite the offset (1/6 of the surface, more than 5 %) is exactly k away, so HD95 = k * spacing of that
axis, whatever the spacing of the other axes.
"""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LabelLoopLib import evaluation

REPO = Path(__file__).resolve().parents[1]
LABELS = {"liver": 1, "spleen": 2}


def cubes(shape, n: int, k: int, axis: int, start: int = 4):
    """Reference cube at ``start`` and the same cube shifted by ``k`` voxels along ``axis``."""
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    box = [slice(start, start + n)] * 3
    ref[tuple(box)] = 1
    box[axis] = slice(start + k, start + k + n)
    pred[tuple(box)] = 1
    return pred, ref


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_offset_cubes_dice_and_hd95_follow_the_spacing_of_the_offset_axis(axis, k):
    n = 16
    spacing = (2.5, 0.8, 1.5)
    pred, ref = cubes((28, 28, 28), n, k, axis)
    dice, hd95 = evaluation.binary_metrics(pred > 0, ref > 0, spacing)
    assert dice == pytest.approx((n - k) / n, abs=1e-6)
    assert hd95 == pytest.approx(k * spacing[axis], abs=1e-6)


def test_grown_cube_dice_volume_and_hd95():
    """Reference = prediction grown by one voxel on every side (isotropic 1 mm): Dice 2n^3 / (n^3 + (n+2)^3);
    the edge voxels of the grown cube (12 n of 6 n^2 + 12 n + 8, over 5 %) are sqrt(2) from the smaller one."""
    n = 20
    pred = np.zeros((30, 30, 30), dtype=np.uint8)
    ref = np.zeros_like(pred)
    pred[5 : 5 + n, 5 : 5 + n, 5 : 5 + n] = 1
    ref[4 : 6 + n, 4 : 6 + n, 4 : 6 + n] = 1
    scores = evaluation.score_arrays(pred, ref, (1.0, 1.0, 1.0), {"liver": 1}, image="grown")
    (s,) = scores
    assert s.dice == pytest.approx(2 * n**3 / (n**3 + (n + 2) ** 3), abs=1e-6)
    assert s.hd95_mm == pytest.approx(math.sqrt(2), abs=1e-6)
    assert s.pred_ml == pytest.approx(n**3 / 1000.0)
    assert s.ref_ml == pytest.approx((n + 2) ** 3 / 1000.0)
    assert s.vol_diff_ml == pytest.approx((n**3 - (n + 2) ** 3) / 1000.0)
    assert s.vol_diff_pct == pytest.approx(100.0 * (n**3 - (n + 2) ** 3) / (n + 2) ** 3)


def test_labels_are_matched_by_name_not_by_value():
    pred = np.zeros((20, 20, 20), dtype=np.uint8)
    ref = np.zeros_like(pred)
    pred[2:8, 2:8, 2:8] = 5  # liver in the prediction's values
    ref[2:8, 2:8, 2:8] = 1  # liver in the reference's values
    pred[10:16, 10:16, 10:16] = 1  # spleen in the prediction's values
    ref[10:16, 10:16, 10:16] = 2
    scores = evaluation.score_arrays(pred, ref, (1, 1, 1), {"spleen": 1, "liver": 5, "extra": 9}, LABELS)
    assert [(s.label, s.dice, s.hd95_mm) for s in scores] == [("liver", 1.0, 0.0), ("spleen", 1.0, 0.0)]


def test_absent_and_missing_structures():
    pred = np.zeros((12, 12, 12), dtype=np.uint8)
    ref = np.zeros_like(pred)
    ref[2:6, 2:6, 2:6] = 1  # liver only in the reference; spleen in neither
    liver, spleen = evaluation.score_arrays(pred, ref, (2, 2, 2), LABELS)
    assert liver.dice == 0.0 and math.isnan(liver.hd95_mm) and liver.note == "missing in prediction"
    assert liver.ref_ml == pytest.approx(64 * 8 / 1000.0) and liver.vol_diff_pct == pytest.approx(-100.0)
    assert math.isnan(spleen.dice) and spleen.note == "absent in both" and not spleen.evaluated
    summary = evaluation.summarize([liver, spleen])
    assert set(summary) == {"liver", "all"} and summary["all"]["n"] == 1
    assert summary["liver"]["hd95_undefined"] == 1


def write(array_zyx: np.ndarray, path: Path, spacing=(1.5, 1.0, 2.0), origin=(10.0, -5.0, 3.0)) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def test_files_use_the_header_spacing_in_x_y_z_order(tmp_path):
    """A shift of k voxels along SimpleITK's x (the last numpy axis) measures k * x-spacing."""
    n, k = 12, 2
    pred, ref = cubes((24, 24, 24), n, k, axis=2)
    p = write(pred, tmp_path / "pred.nii.gz")
    r = write(ref, tmp_path / "ref.nii.gz")
    (liver, spleen) = evaluation.score_files(str(p), str(r), LABELS, image="case")
    assert liver.dice == pytest.approx((n - k) / n) and liver.hd95_mm == pytest.approx(k * 1.5)
    voxel_ml = 1.5 * 1.0 * 2.0 / 1000.0
    assert liver.ref_ml == pytest.approx(n**3 * voxel_ml) and liver.vol_diff_ml == pytest.approx(0.0)
    assert spleen.note == "absent in both"

    csv_path = evaluation.write_csv([liver, spleen], str(tmp_path / "out" / "metrics.csv"))
    rows = list(csv.DictReader(open(csv_path)))
    assert rows[0]["image"] == "case" and rows[0]["label"] == "liver"
    assert float(rows[0]["dice"]) == pytest.approx((n - k) / n, abs=1e-4)
    assert float(rows[0]["hd95_mm"]) == pytest.approx(3.0) and rows[1]["dice"] == ""
    png = evaluation.box_plot([liver, spleen], str(tmp_path / "plot.png"))
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = evaluation.format_summary([liver, spleen])
    assert "liver" in text and "worst cases" in text and "0.833" in text


def test_the_summary_says_how_many_measurements_have_no_hd95():
    """A structure the prediction misses in two images and finds in one has one HD95: the table's HD95 is that one,
    and its ``no HD95`` column says 2, so the mean is not read as a mean over three images."""
    scores = [
        evaluation.LabelScore("a", "spleen", 0.0, math.nan, 200.0, 0.0, "missing in prediction"),
        evaluation.LabelScore("b", "spleen", 0.0, math.nan, 210.0, 0.0, "missing in prediction"),
        evaluation.LabelScore("c", "spleen", 0.0, 215.25, 190.0, 3.0),
        evaluation.LabelScore("c", "liver", 0.9, 4.0, 1500.0, 1450.0),
    ]
    rows = {line.split()[0]: line.split() for line in evaluation.format_summary(scores).splitlines()[2:5]}
    header = evaluation.format_summary(scores).splitlines()[1]
    assert "no HD95" in header
    # structure, n, Dice mean, median, min, HD95 mean, median, max, no HD95, |dVol| %
    assert rows["spleen"][1] == "3" and rows["spleen"][5:9] == ["215.25", "215.25", "215.25", "2"]
    assert rows["liver"][5:9] == ["4.00", "4.00", "4.00", "0"]
    assert rows["all"][1] == "4" and rows["all"][8] == "2"


def test_files_on_different_grids_are_refused(tmp_path):
    a = write(np.zeros((8, 8, 8), np.uint8), tmp_path / "a.nii.gz")
    b = write(np.zeros((8, 8, 8), np.uint8), tmp_path / "b.nii.gz", spacing=(1.0, 1.0, 1.0))
    with pytest.raises(evaluation.EvaluationError, match="grids differ: spacing"):
        evaluation.score_files(str(a), str(b), LABELS)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(evaluation.EvaluationError, match="cannot read 'bad.nii.gz'"):
        evaluation.score_files(str(bad), str(b), LABELS)


def test_lib_imports_without_monai_simpleitk_or_torch():
    code = (
        "import sys, LabelLoopLib.evaluation, LabelLoopLib.cli\n"
        "heavy = [m for m in ('monai', 'SimpleITK', 'torch', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "slicer_extension" / "LabelLoop")
