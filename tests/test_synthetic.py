"""Tests of the synthetic phantom generator (sample data for the app, the tests and the benchmarks)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from labelloop_app import synthetic
from labelloop_app.synthetic import (
    CLASSES,
    ORIENTATION_CYCLE,
    SEG_LABELS,
    cohort_plan,
    generate_sample_data,
    make_lesion_phantom,
    make_phantom,
    phantom_case,
    phantom_geometry,
)

TINY = {
    "n_seg": 3,
    "n_seg_labeled": 1,
    "n_seg_heldout": 1,
    "n_cls": 4,
    "n_cls_labeled": 2,
    "n_cls_heldout": 2,
    "seed": 3,
    "small": True,
    "progress": False,
    "workers": 1,
}


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _centroid(label: sitk.Image, value: int) -> np.ndarray:
    """Physical (LPS) centroid of a label value."""
    idx = np.argwhere(sitk.GetArrayFromImage(label) == value)[:, ::-1].mean(axis=0)
    return np.array(label.TransformContinuousIndexToPhysicalPoint([float(x) for x in idx]))


def _orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def test_same_seed_is_identical_and_different_seed_differs():
    img_a, lab_a = make_phantom(5, small=True)
    img_b, lab_b = make_phantom(5, small=True)
    assert _geometry(img_a) == _geometry(img_b)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img_a), sitk.GetArrayFromImage(img_b))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(lab_a), sitk.GetArrayFromImage(lab_b))
    img_c, lab_c = make_phantom(6, small=True)
    same_grid = _geometry(img_c) == _geometry(img_a)
    assert not same_grid or not np.array_equal(sitk.GetArrayFromImage(img_a), sitk.GetArrayFromImage(img_c))
    les_a, info_a = make_lesion_phantom(5, lesion=True, small=True)
    les_b, info_b = make_lesion_phantom(5, lesion=True, small=True)
    assert info_a == info_b
    np.testing.assert_array_equal(sitk.GetArrayFromImage(les_a), sitk.GetArrayFromImage(les_b))


@pytest.mark.parametrize("seed", range(5))
def test_image_and_label_share_the_grid(seed):
    image, label = make_phantom(seed, small=True)
    assert _geometry(image) == _geometry(label)
    assert image.GetPixelID() == sitk.sitkInt16
    assert label.GetPixelID() == sitk.sitkUInt8
    values = set(np.unique(sitk.GetArrayFromImage(label)).tolist())
    assert values <= {0, *SEG_LABELS.values()}
    assert len(values) > 1


def test_full_case_has_every_organ_with_plausible_hu():
    case = phantom_case(1, size=(128, 128, 60), fov="full", hard=False)
    assert {name: o["status"] for name, o in case.info["organs"].items()} == dict.fromkeys(SEG_LABELS, "full")
    img = sitk.GetArrayFromImage(case.image).astype(np.int32)
    assert img.min() >= -1024
    assert -1024 <= np.percentile(img, 5) <= -950  # air around the body
    assert img.max() > 300  # spine / ribs
    kidney = (130, 215) if case.info["contrast"] == "enhanced" else (10, 55)
    expected = {"liver": (40, 85), "spleen": (30, 75), "kidney_left": kidney, "kidney_right": kidney}
    for name, (lo, hi) in expected.items():
        core = sitk.GetArrayFromImage(sitk.BinaryErode(case.label == SEG_LABELS[name], [1, 1, 1])) > 0
        assert core.sum() > 20, name
        assert lo <= np.median(img[core]) <= hi, (name, np.median(img[core]))
    liver, spleen = _centroid(case.label, 1), _centroid(case.label, 2)
    kidneys = [_centroid(case.label, SEG_LABELS[k]) for k in ("kidney_left", "kidney_right")]
    assert liver[0] < 0 < spleen[0]  # LPS: patient right is -x
    assert kidneys[1][0] < 0 < kidneys[0][0]
    assert all(k[1] > liver[1] for k in kidneys)  # kidneys are posterior (+y in LPS)


def test_forcing_the_contrast_phase_changes_only_the_enhancing_structures():
    seed = next(s for s in range(50) if phantom_geometry(s, small=True, fov="full")["contrast"] == "enhanced")
    enhanced = phantom_case(seed, small=True, fov="full")
    native = phantom_case(seed, small=True, fov="full", enhanced=False)
    assert (enhanced.info["contrast"], native.info["contrast"]) == ("enhanced", "native")
    assert native.info["noise_hu"] == enhanced.info["noise_hu"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(native.label), sitk.GetArrayFromImage(enhanced.label))
    labels = sitk.GetArrayFromImage(enhanced.label)
    hu_enhanced = sitk.GetArrayFromImage(enhanced.image).astype(float)
    hu_native = sitk.GetArrayFromImage(native.image).astype(float)
    for name in ("kidney_left", "kidney_right"):  # enhancing: 150-200 HU against 25-40 HU native
        organ = labels == SEG_LABELS[name]
        assert np.median(hu_enhanced[organ]) > np.median(hu_native[organ]) + 80, name
    for name in ("liver", "spleen"):  # parenchyma keeps its HU; only the vessels in it change
        organ = labels == SEG_LABELS[name]
        assert abs(np.median(hu_enhanced[organ]) - np.median(hu_native[organ])) < 5, name
    assert (np.abs(hu_enhanced - hu_native)[labels == 0] > 1).mean() < 0.1  # aorta and veins, not the body


def test_situs_inversus_mirrors_liver_and_spleen_and_keeps_the_rest():
    normal = phantom_case(1, small=True, fov="full", hard=False)
    mirrored = phantom_case(1, small=True, fov="full", hard=False, mirrored=True)
    assert mirrored.info["situs"] == "inversus" and "situs" not in normal.info
    assert _geometry(mirrored.image) == _geometry(normal.image) == _geometry(mirrored.label)
    assert mirrored.info["noise_hu"] == normal.info["noise_hu"]
    for name in ("liver", "spleen"):  # the same organ, on the other side of the midplane
        a, b = _centroid(normal.label, SEG_LABELS[name]), _centroid(mirrored.label, SEG_LABELS[name])
        assert a[0] * b[0] < 0 and abs(a[0] + b[0]) < 10, name
        assert np.allclose(a[1:], b[1:], atol=10), name
    assert _centroid(mirrored.label, SEG_LABELS["liver"])[0] > 0 > _centroid(mirrored.label, SEG_LABELS["spleen"])[0]
    for name in ("kidney_left", "kidney_right"):  # in place
        assert np.allclose(
            _centroid(normal.label, SEG_LABELS[name]), _centroid(mirrored.label, SEG_LABELS[name]), atol=2
        )
    counts = [np.bincount(sitk.GetArrayFromImage(c.label).ravel(), minlength=5) for c in (normal, mirrored)]
    assert np.allclose(counts[0][1:], counts[1][1:], rtol=0.1)


def test_orientation_never_changes_anatomy():
    ras_img, ras_lab = make_phantom(7, orientation="RAS", small=True)
    lps_img, lps_lab = make_phantom(7, orientation="LPS", small=True)
    assert _orientation_code(ras_img) == "RAS" and _orientation_code(lps_img) == "LPS"
    assert ras_img.GetDirection() != lps_img.GetDirection()
    resampled = sitk.Resample(lps_lab, ras_lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    agree = sitk.GetArrayFromImage(resampled) == sitk.GetArrayFromImage(ras_lab)
    assert agree.mean() > 0.999
    # a permuted-axis header and an oblique one: same organs, voxels no longer coincide
    for orientation, oblique in (("LIP", 0.0), ("RAS", 10.0)):
        _, other = make_phantom(7, orientation=orientation, oblique_deg=oblique, spacing=(4.0, 4.0, 4.0))
        on_ras = sitk.GetArrayFromImage(sitk.Resample(other, ras_lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        ref = sitk.GetArrayFromImage(ras_lab)
        for name, value in SEG_LABELS.items():
            a, b = on_ras == value, ref == value
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice > 0.8, (orientation, oblique, name, dice)


@pytest.mark.parametrize("orientation,oblique", [*ORIENTATION_CYCLE, ("PSR", 0.0)])
def test_liver_is_on_the_patient_right_in_every_orientation(orientation, oblique):
    image, label = make_phantom(2, orientation=orientation, oblique_deg=oblique, small=True)
    if not oblique:
        assert _orientation_code(image) == orientation
    liver, spleen = _centroid(label, SEG_LABELS["liver"]), _centroid(label, SEG_LABELS["spleen"])
    ras_x = -liver[0]  # RAS x = -LPS x
    assert liver[0] < 0 and ras_x > 0 and spleen[0] > 0
    _, reference = make_phantom(2, orientation="LPS", small=True)
    np.testing.assert_allclose(liver, _centroid(reference, SEG_LABELS["liver"]), atol=1e-3 if not oblique else 6.0)


def test_default_cohort_is_diverse():
    plan = cohort_plan("seg", 24, seed=0)
    assert len({c["seed"] for c in plan}) == 24
    geoms = [phantom_geometry(**{k: v for k, v in c.items() if k != "id"}) for c in plan]
    codes = {(g["orientation"], g["oblique_deg"] != 0) for g in geoms}
    assert {("RAS", False), ("LPS", False), ("LAS", False), ("LIP", False), ("RAS", True)} <= codes
    assert sum(g["direction"] != [-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0] for g in geoms) >= 12  # mostly non-RAS
    for g in geoms:
        spacing = sorted(g["spacing"])
        size = sorted(g["size"])
        assert spacing[2] / spacing[0] > 1.9  # anisotropic: thick slices
        assert 0.69 <= spacing[0] <= 1.01 and 2.0 <= spacing[2] <= 5.0
        assert 256 <= size[2] <= 384 and 40 <= size[0] <= 90
    assert {g["fov"] for g in geoms} == set(synthetic.FOV_MODES)
    assert any(g["hard"] for g in geoms) and not all(g["hard"] for g in geoms)
    # rendered (small grids over the same field of view): cut cases cut an organ, full cases keep all
    for c in plan[:7]:
        case = phantom_case(**{k: v for k, v in c.items() if k != "id"}, small=True)
        status = {o["status"] for o in case.info["organs"].values()}
        assert status == {"full"} if c["fov"] == "full" else "cut" in status, (c, case.info["organs"])
    top = phantom_case(**{k: v for k, v in plan[2].items() if k != "id"}, small=True)
    assert plan[2]["fov"] == "cut_top" and top.info["organs"]["liver"]["status"] == "cut"


def test_classification_cohort_is_roughly_balanced():
    for n, n_labeled in ((40, 16), (24, 0), (4, 2)):
        plan = cohort_plan("cls", n, seed=0, n_labeled=n_labeled)
        n_lesion = sum(c["lesion"] for c in plan)
        assert 0 < n_lesion < n
        if n >= 4:
            assert 2 * n_lesion != n
        if n_labeled >= 2:
            assert {c["lesion"] for c in plan[:n_labeled]} == {True, False}
    assert {c["seed"] for c in cohort_plan("cls", 8)}.isdisjoint({c["seed"] for c in cohort_plan("cls_heldout", 8)})


def test_lesion_phantom_has_lesion_of_requested_size():
    radius, contrast = 10.0, -40.0
    les_img, les = make_lesion_phantom(21, lesion=True, lesion_radius_mm=radius, lesion_contrast_hu=contrast)
    nor_img, nor = make_lesion_phantom(21, lesion=False)
    assert les["class"] == "lesion" and nor["class"] == "normal"
    assert les["lesion_radius_mm"] == radius and les["contrast_hu"] == contrast
    assert nor["lesion_radius_mm"] == 0.0 and nor["centre"] is None and nor["lesion_voxels"] == 0
    assert _geometry(les_img) == _geometry(nor_img)
    spacing = np.array(les_img.GetSpacing())
    expected = 4.0 / 3.0 * np.pi * radius**3 / np.prod(spacing)
    assert 0.75 * expected <= les["lesion_voxels"] <= 1.25 * expected
    diff = sitk.GetArrayFromImage(les_img).astype(np.int32) - sitk.GetArrayFromImage(nor_img).astype(np.int32)
    changed = np.argwhere(np.abs(diff) > abs(contrast) / 2)[:, ::-1]
    assert 0.6 * expected <= len(changed) <= 1.4 * expected
    pts = np.array([les_img.TransformIndexToPhysicalPoint([int(x) for x in p]) for p in changed])
    dist = np.linalg.norm(pts - np.array(les["centre"]), axis=1)
    assert dist.max() <= radius * 1.2 + spacing.max()  # the only change is the lesion, where it was said to be
    assert np.median(diff[np.abs(diff) > abs(contrast) / 2]) < 0  # hypodense as requested
    assert np.count_nonzero(diff) < 0.01 * diff.size  # normal = same torso without the lesion


def test_default_lesion_parameters_cover_hard_and_easy_cases():
    infos = [make_lesion_phantom(s, lesion=True, small=True)[1] for s in range(40)]
    near = [i for i in infos if i["near_limit"]]
    plain = [i for i in infos if not i["near_limit"]]
    assert all(3.0 <= i["lesion_radius_mm"] <= 8.0 and 10.0 <= abs(i["contrast_hu"]) <= 25.0 for i in near)
    assert all(8.0 <= i["lesion_radius_mm"] <= 20.0 and 25.0 <= abs(i["contrast_hu"]) <= 60.0 for i in plain)
    assert 2 <= len(near) <= 16  # NEAR_LIMIT_FRACTION of 40: a minority, but present
    assert min(i["lesion_radius_mm"] for i in plain) < 10.0 and max(i["lesion_radius_mm"] for i in plain) > 15.0
    assert {np.sign(i["contrast_hu"]) for i in infos} == {-1.0, 1.0}
    assert make_lesion_phantom(0, lesion=False, small=True)[1]["near_limit"] is None
    grid = make_lesion_phantom(0, lesion=False)[1]
    assert 96 <= grid["size"][0] <= 128 and 2.0 <= grid["spacing"][0] <= 3.0 and 30 <= min(grid["size"]) <= 50


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def test_generate_sample_data_layout_and_rerun(tmp_path):
    out = tmp_path / "sample-data"
    summary = generate_sample_data(out, **TINY)
    assert not summary["skipped"]
    assert json.loads((out / "labels.json").read_text()) == SEG_LABELS
    studies = sorted(p.name for p in (out / "segmentation").glob("*.nii.gz"))
    assert studies == [f"phantom_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (out / "segmentation_truth").glob("*.nii.gz")) == studies
    assert sorted(p.name for p in (out / "segmentation" / "labels" / "final").glob("*.nii.gz")) == studies[:1]
    for name in studies:
        image, truth = _read(out / "segmentation" / name), _read(out / "segmentation_truth" / name)
        assert image.GetPixelID() == sitk.sitkInt16 and truth.GetPixelID() == sitk.sitkUInt8
        assert _geometry(image) == _geometry(truth)
        assert set(np.unique(sitk.GetArrayFromImage(truth)).tolist()) <= {0, *SEG_LABELS.values()}
    final = _read(out / "segmentation" / "labels" / "final" / studies[0])
    truth0 = _read(out / "segmentation_truth" / studies[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(final), sitk.GetArrayFromImage(truth0))
    expected_img, _ = make_phantom(
        **{k: v for k, v in cohort_plan("seg", 1, seed=3)[0].items() if k != "id"}, small=True
    )
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(_read(out / "segmentation" / studies[0])), sitk.GetArrayFromImage(expected_img)
    )
    ho_images = sorted(p.name for p in (out / "segmentation_heldout" / "images").glob("*.nii.gz"))
    ho_labels = sorted(p.name for p in (out / "segmentation_heldout" / "labels").glob("*.nii.gz"))
    assert len(ho_images) == 1 and ho_images == ho_labels and ho_images[0] not in studies
    cases = json.loads((out / "segmentation_truth" / "cases.json").read_text())
    assert sorted(cases) == [s[: -len(".nii.gz")] for s in studies]

    cls = sorted(p.name[: -len(".nii.gz")] for p in (out / "classification").glob("*.nii.gz"))
    assert cls == [f"lesion_{i:03d}" for i in range(4)]
    truth = json.loads((out / "classification_truth.json").read_text())
    assert sorted(truth) == cls
    assert all(t["class"] in CLASSES and {"lesion_radius_mm", "contrast_hu"} <= set(t) for t in truth.values())
    labeled = json.loads((out / "classification_labeled.json").read_text())
    assert list(labeled) == cls[:2] and all(labeled[k] == truth[k]["class"] for k in labeled)
    ho_truth = json.loads((out / "classification_heldout" / "truth.json").read_text())
    ho_cls = sorted(p.name[: -len(".nii.gz")] for p in (out / "classification_heldout" / "images").glob("*.nii.gz"))
    assert sorted(ho_truth) == ho_cls and len(ho_cls) == 2 and not set(ho_cls) & set(cls)
    readme = (out / "README.md").read_text()
    assert "python -m labelloop_app.synthetic" in readme and "seed 3" in readme
    assert (out / ".complete").is_file() and not (out / ".tmp").exists()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = generate_sample_data(out, **TINY)
    assert again["skipped"] and again["files"] == summary["files"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes

    fewer = generate_sample_data(out, **{**TINY, "n_seg": 2})
    assert not fewer["skipped"] and fewer["removed_stale"] == 2
    assert not (out / "segmentation" / "phantom_002.nii.gz").exists()
    assert not (out / "segmentation_truth" / "phantom_002.nii.gz").exists()


def test_incomplete_folder_is_completed_with_identical_files(tmp_path):
    out = tmp_path / "data"
    generate_sample_data(out, **TINY)
    before = sitk.GetArrayFromImage(_read(out / "classification" / "lesion_001.nii.gz"))
    (out / ".complete").unlink()  # as if the run had been interrupted
    os.remove(out / "classification" / "lesion_001.nii.gz")
    summary = generate_sample_data(out, **TINY)
    assert not summary["skipped"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_read(out / "classification" / "lesion_001.nii.gz")), before)
    assert json.loads((out / ".complete").read_text())["params"]["n_seg"] == TINY["n_seg"]
    assert generate_sample_data(out, **TINY)["skipped"]


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--small", "--seed", "1", "--n-seg", "1", "--n-seg-labeled", "1"]
    args += ["--n-seg-heldout", "0", "--n-cls", "2", "--n-cls-labeled", "2", "--n-cls-heldout", "0"]
    assert synthetic.main([*args, "--workers", "1", "--no-progress"]) == 0
    assert (out / "segmentation" / "labels" / "final" / "phantom_000.nii.gz").is_file()
    assert len(json.loads((out / "classification_labeled.json").read_text())) == 2


@pytest.mark.parametrize("seed", [5, 12])
def test_noise_power_is_the_spectrum_of_the_noise_the_generator_adds(seed):
    """``noise_power`` (what the ideal-observer analysis divides by) matches the averaged periodogram of the noise
    ``_render`` adds, for the case's own acquisition: its level, its in-plane correlation and the rounding."""
    acq = synthetic.lesion_acquisition(seed)
    shape = (16, 96, 96)
    rng = np.random.default_rng(0)
    fields = [
        synthetic._shape_noise(rng.standard_normal(shape, dtype=np.float32), acq).astype(np.float64)
        + rng.uniform(-0.5, 0.5, shape)  # what rounding to integer HU adds
        for _ in range(20)
    ]
    measured = np.mean([np.abs(np.fft.fftn(f)) ** 2 / f.size for f in fields], axis=0)
    model = synthetic.noise_power(shape, acq)
    assert np.mean(model) == pytest.approx(acq["noise_hu"] ** 2 + 1 / 12, rel=0.05)  # Parseval: the variance
    ratio = measured / model
    assert 0.9 < np.median(ratio) < 1.1
    # correlated in-plane: far more power at low than at high in-plane frequencies, none of it lost
    low, high = model[:, :4, :4].mean(), model[:, 40:56, 40:56].mean()
    assert low > 10 * high and measured[:, :4, :4].mean() == pytest.approx(low, rel=0.15)
    assert measured[:, 40:56, 40:56].mean() == pytest.approx(high, rel=0.15)
