"""Geometry: reading grids, MONAI affines, and restoring predictions onto the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import LoadImage, Orientation, Spacing

from conftest import REALDATA
from labelloop_app.geometry import (
    Geometry,
    UnreadableImageError,
    _linear_argmax,
    geometry_from_ras_affine,
    read_geometry,
    read_image,
    restore_labels,
)
from labelloop_app.synthetic import make_phantom
from labelloop_app.transforms import LoadSITKd, RestoreLabelsd, channel_values


def _oblique(angles=(0.1, 0.05, 0.2)) -> tuple:
    t = sitk.Euler3DTransform()
    t.SetRotation(*angles)
    return tuple(t.GetMatrix())


def test_ras_affine_round_trip():
    g = Geometry((30, 20, 10), (0.7, 0.9, 3.0), (-12.5, 40.0, 7.0), _oblique())
    back = geometry_from_ras_affine(g.ras_affine(), g.size)
    assert back.mismatches(g) == []
    np.testing.assert_allclose(back.direction, g.direction, atol=1e-12)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_load_sitk_matches_monai_itk_reader(tmp_path, suffix):
    image, _ = make_phantom(3, size=(40, 36, 12), spacing=(4.0, 4.5, 7.0), orientation="LPS", oblique_deg=10.0)
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(image, str(path))
    ours = LoadSITKd(keys="image")({"image": str(path)})["image"]
    monai = LoadImage(reader="ITKReader", ensure_channel_first=True)(str(path))
    np.testing.assert_allclose(np.asarray(ours.affine), np.asarray(monai.affine), atol=1e-4)
    np.testing.assert_array_equal(ours.numpy(), monai.numpy())


def test_restore_puts_prediction_back_exactly_and_equals_full_resampling():
    target = Geometry((120, 100, 40), (0.8, 0.8, 2.5), (-50.0, -40.0, -50.0), _oblique())
    source = Geometry((40, 40, 30), (3.0, 3.0, 4.0), (-70.0, -70.0, -70.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    scores = np.zeros((3, 40, 40, 30), np.float32)
    scores[0] = 1
    scores[1, 10:20, 12:25, 8:18] = 2
    scores[2, 24:32, 20:30, 10:20] = 2
    values = np.array([0, 5, 7])
    out = restore_labels(scores, source, target, values)
    assert Geometry.of(out).mismatches(target) == []
    restored = sitk.GetArrayFromImage(out)
    assert set(np.unique(restored)) == {0, 5, 7}
    np.testing.assert_array_equal(restored, _linear_argmax(scores, source, target, values))
    nearest = sitk.GetArrayFromImage(restore_labels(scores, source, target, values, mode="nearest"))
    assert (nearest == restored).mean() > 0.99


def test_restore_of_empty_prediction_is_all_background():
    target = Geometry((20, 20, 10), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    scores = np.zeros((2, 10, 10, 5), np.float32)
    scores[0] = 1
    out = restore_labels(scores, target, target, np.array([0, 1]))
    assert Geometry.of(out) == target and not sitk.GetArrayFromImage(out).any()


def test_pipeline_round_trip_through_monai_orientation_and_spacing(tmp_path):
    """A perfect 'network' (the one-hot label itself) comes back as the label on the input grid."""
    image, label = make_phantom(11, size=(64, 60, 20), spacing=(3.0, 3.0, 6.0), orientation="LAS")
    lpath = tmp_path / "label.nii.gz"
    sitk.WriteImage(label, str(lpath))
    d = LoadSITKd(keys="image")({"image": str(lpath)})
    x = Spacing(pixdim=(2.0, 2.0, 3.0), mode="nearest")(Orientation(axcodes="RAS")(d["image"]))
    onehot = torch.cat([(x == v).float() for v in range(5)])
    d["image"] = x
    d["pred"] = onehot
    out = RestoreLabelsd(values=channel_values({"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}))(d)
    restored = sitk.GetArrayFromImage(out["pred"])
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(lpath)))
    assert Geometry.of(out["pred"]) == read_geometry(str(lpath))  # NIfTI stores the origin in float32
    for v in range(1, 5):
        a, b = restored == v, truth == v
        if b.sum():
            assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9


def test_mismatch_messages_name_the_property():
    g = Geometry((10, 10, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    other = Geometry((10, 10, 9), (1.0, 1.0, 2.0), (0.0, 5.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    text = " ".join(g.mismatches(other))
    for word in ("size", "spacing", "origin", "direction"):
        assert word in text


def test_unreadable_and_wrong_dimension_files(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(UnreadableImageError, match="readable image format"):
        read_image(str(bad))
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(flat))
    with pytest.raises(UnreadableImageError, match="3D"):
        read_image(str(flat))


def test_real_headers_read():
    g = read_geometry(str(REALDATA / "pyradiomics" / "brain1_image.nrrd"))
    assert g.size == (256, 256, 25)
    assert g.spacing[2] > 6.0
    dicom = read_image(str(REALDATA / "totalsegmentator" / "example_ct_dicom"))
    assert dicom.GetSize() == (512, 512, 20)
