"""``--conf`` parsing, label value mapping, intensity transforms and remapping by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REALDATA
from labelloop_app.conf import ConfError, SegmentationConf, parse_labels, parse_tasks
from labelloop_app.datastore import present_values
from labelloop_app.labels import DEFAULT_SEG_LABELS, remap_by_name
from labelloop_app.networks import segmentation_network
from labelloop_app.transforms import LabelValuesToChannelsd, channel_values, intensity_transforms
from labelloop_app.uncertainty import (
    entropy,
    expected_dice_loss,
    fragmentation,
    least_confidence,
    margin,
    sample_dice_loss,
)


def test_labels_from_comma_list_json_and_file(tmp_path):
    assert parse_labels("liver, spleen") == {"liver": 1, "spleen": 2}
    assert parse_labels('{"liver": 5, "spleen": 1}') == {"liver": 5, "spleen": 1}
    f = tmp_path / "labels.json"
    f.write_text(json.dumps({"background": 0, "kidney_left": 3}))
    assert parse_labels(str(f)) == {"kidney_left": 3}
    assert parse_labels(None) == DEFAULT_SEG_LABELS


def test_labels_from_totalsegmentator_value_to_name_file():
    labels = parse_labels(str(REALDATA / "totalsegmentator" / "labels.json"))
    assert labels["spleen"] == 1 and labels["liver"] == 5 and labels["kidney_left"] == 3


@pytest.mark.parametrize("bad", ['{"a": 1, "b": 1}', '{"a": 0}', '{"a": 300}', "{oops"])
def test_bad_labels_rejected(bad):
    with pytest.raises(ConfError):
        parse_labels(bad)


def test_segmentation_conf_parsing_and_errors():
    c = SegmentationConf.from_conf({"network": "SegResNet", "modality": "mri", "target_spacing": "1.5", "labels": ""})
    assert c.network == "segresnet" and c.modality == "MR" and c.target_spacing == (1.5, 1.5, 1.5)
    assert c.out_channels == 5 and c.channel_of == {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}
    for bad in ({"network": "vnet"}, {"modality": "PET"}, {"roi_size": "1,2"}, {"restore": "cubic"}):
        with pytest.raises(ConfError):
            SegmentationConf.from_conf(bad)
    with pytest.raises(ConfError):
        parse_tasks("segmentation,nope")


@pytest.mark.parametrize("name", ["unet", "dynunet", "segresnet", "attentionunet"])
def test_every_network_maps_a_patch_to_class_scores(name):
    net = segmentation_network(name, out_channels=3).eval()
    with torch.no_grad():
        y = net(torch.zeros(1, 1, 32, 32, 32))
    assert y.shape == (1, 3, 32, 32, 32)
    assert any(isinstance(m, (torch.nn.Dropout, torch.nn.Dropout3d)) for m in net.modules())


def test_label_values_map_to_channels_and_unknown_values_become_background():
    t = LabelValuesToChannelsd(keys="label", labels={"liver": 5, "spleen": 1})
    label = torch.tensor([[[[0, 5, 1, 9]]]], dtype=torch.float32)
    out = t({"label": label})["label"]
    assert out.flatten().tolist() == [0, 1, 2, 0]
    np.testing.assert_array_equal(channel_values({"liver": 5, "spleen": 1}), [0, 5, 1])


def test_ct_window_and_mr_zscore():
    ct = intensity_transforms("image", "CT", (-100.0, 100.0))[0]
    x = ct({"image": torch.tensor([[-1000.0, 0.0, 1000.0]])})["image"]
    assert x.flatten().tolist() == [0.0, 0.5, 1.0]
    mr = intensity_transforms("image", "MR", (0, 0))[0]
    y = mr({"image": torch.tensor([[0.0, 10.0, 20.0, 30.0]])})["image"].flatten()
    assert y[0] == 0 and abs(float(y[1:].mean())) < 1e-6


def test_remap_real_totalsegmentator_reference_by_name():
    ts_labels = {v: int(k) for k, v in json.loads((REALDATA / "totalsegmentator" / "labels.json").read_text()).items()}
    seg = sitk.GetArrayFromImage(
        sitk.ReadImage(str(REALDATA / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"))
    )
    ours = remap_by_name(seg, ts_labels, DEFAULT_SEG_LABELS)
    assert set(np.unique(ours)) <= {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(ours == 1, seg == ts_labels["liver"])
    np.testing.assert_array_equal(ours == 3, seg == ts_labels["kidney_left"])


def test_uncertainty_measures():
    certain = np.array([1.0, 0.0, 0.0])
    tie = np.array([0.5, 0.5, 0.0])
    uniform = np.full(3, 1 / 3)
    assert entropy(certain) < 1e-6 and abs(entropy(uniform) - 1.0) < 1e-9
    assert margin(certain) == 0.0 and margin(tie) == 1.0
    assert least_confidence(certain) == 0.0 and abs(least_confidence(uniform) - 1.0) < 1e-9
    voxels = np.stack([np.ones((2, 2)), np.zeros((2, 2))])
    assert entropy(voxels).shape == (2, 2)


def test_dice_losses_weigh_every_structure_alike():
    """A structure of 4 voxels with an uncertain half counts as much as one of 60 that is certain."""
    probs = np.zeros((3, 8, 8))
    probs[0] = 1.0
    probs[0, :6], probs[1, :6] = 0.0, 1.0  # structure 1: 48 voxels, certain
    probs[0, 7, :4], probs[2, 7, :4] = 0.0, 1.0  # structure 2: 4 voxels
    assert expected_dice_loss(probs, [1, 2]) == 0.0
    unsure = probs.copy()
    unsure[2, 7, :2], unsure[0, 7, :2] = 0.6, 0.4  # still predicted, with probability 0.6
    # structure 2: predicted 4 voxels, probability mass 3.2, overlap 3.2 -> Dice 6.4 / 7.2
    assert abs(expected_dice_loss(unsure, [1, 2]) - (1 - (1 + 6.4 / 7.2) / 2)) < 1e-9
    assert abs(expected_dice_loss(unsure, [2]) - (1 - 6.4 / 7.2)) < 1e-9

    moved = probs.copy()
    moved[2, 7, :4], moved[0, 7, :4] = 0.0, 1.0
    moved[2, 7, 2:6], moved[0, 7, 2:6] = 1.0, 0.0  # structure 2 shifted by two voxels
    samples = np.stack([probs, probs, probs, moved])
    # mean prediction keeps the original outline; one sample of four overlaps it by half
    assert abs(sample_dice_loss(samples, [2]) - (1 - (3 + 0.5) / 4)) < 1e-9
    assert sample_dice_loss(samples, [1]) == 0.0
    absent = np.zeros((3, 8, 8))
    absent[0] = 1.0
    assert sample_dice_loss(absent[None], [1, 2]) == 0.0 and expected_dice_loss(absent, [1, 2]) == 0.0


def test_fragmentation_is_the_share_of_each_structure_outside_its_largest_piece():
    prediction = np.zeros((10, 10, 10), dtype=np.uint8)
    prediction[:4, :4, :4] = 1  # structure 1: one piece of 64 voxels
    assert fragmentation(prediction, [1, 2]) == 0.0  # structure 2 absent: not counted
    prediction[6:8, 6:8, 6:8] = 2  # structure 2: pieces of 8 and 4 voxels, apart
    prediction[0, 8:10, 8:10] = 2
    assert fragmentation(prediction, [1, 2]) == pytest.approx((0.0 + 4 / 12) / 2)
    prediction[4, 4, 4] = 1  # a corner-touching voxel joins structure 1 (full connectivity)
    assert fragmentation(prediction, [1]) == 0.0
    assert fragmentation(np.zeros((4, 4, 4)), [1, 2]) == 0.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32])
def test_present_values_match_numpy_unique(dtype):
    rng = np.random.default_rng(4)
    values = rng.choice(np.array([0, 2, 7, 300 if dtype != np.uint8 else 9]), size=(6, 7, 8)).astype(dtype)
    if np.issubdtype(dtype, np.signedinteger):
        values[0, 0, 0] = -3
    np.testing.assert_array_equal(present_values(values), np.unique(values))


def test_request_parameters_are_read_as_the_tasks_use_them():
    from labelloop_app.request_params import INFER_RULES, TRAIN_RULES, checked, read_params

    config = {"max_epochs": 50, "pretrained": True, "dataset": "CacheDataset", "device": ["cpu"]}
    typed, found = read_params(
        {"max_epochs": "2", "pretrained": "false", "val_split": "0.25", "device": "cuda", "train_ds": [1], "x": 1},
        TRAIN_RULES,
        config,
    )
    assert found == []
    assert typed == {"max_epochs": 2, "pretrained": False, "val_split": 0.25, "device": "cuda", "train_ds": [1], "x": 1}
    assert isinstance(typed["max_epochs"], int) and typed["pretrained"] is False
    _, found = read_params({"max_epochs": True, "learning_rate": float("nan"), "pretrianed": 1}, TRAIN_RULES, config)
    assert found == [
        "max_epochs takes a whole number of epochs, at least 1, not True",
        "learning_rate takes a number, 0 or more, not nan",
        "unknown parameter 'pretrianed': did you mean 'pretrained'?",
    ]
    typed, found = read_params({"roi_size": "[48, 48, 32]", "image": "a", "sw_overlp": 0.5}, INFER_RULES)
    assert typed["roi_size"] == [48, 48, 32] and found == []  # near misses are only looked for in training
    assert read_params({"roi_size": 64}, INFER_RULES)[0]["roi_size"] == [64, 64, 64]
    assert read_params({"roi_size": "48,48"}, INFER_RULES)[1] != []
    assert checked("x", None, TRAIN_RULES) is None and checked("x", {}, TRAIN_RULES) == {}
