"""Unit tests of the classification task's pieces: configuration, networks, metrics, class labels, datastore,
the whole-volume transforms and the explanation maps (no server)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from ignite.engine import Engine
from monailabel.config import settings
from scipy import ndimage

from conftest import snapshot
from labelloop_app.class_labels import (
    CLASS_TAG,
    ClassLabelCheck,
    class_findings_of,
    class_from_info,
    class_labels_of,
    class_summary,
    findings_from_info,
    findings_outside,
    parse_findings,
    read_class_document,
    read_class_label,
    write_class_label,
)
from labelloop_app.classification_metrics import ClassificationMetrics, classification_report, selection_score
from labelloop_app.conf import TASKS, ClassificationConf, ConfError, parse_tasks
from labelloop_app.datastore import LabelLoopDatastore
from labelloop_app.detector import (
    DEFAULT_PATCH,
    LEGACY_PATCH,
    ClassMapUNet,
    EvidenceCalibration,
    FindingsToMaskd,
    HardNegativeIndicesd,
    HardNegatives,
    ImageProbabilitiesd,
    PatchClassd,
    PatchWindowInferer,
    detector_input_transforms,
    fit_evidence_bias,
    image_probabilities,
)
from labelloop_app.errors import BadRequest, UnprocessableInput
from labelloop_app.explain import explain_method, gradcam_map, occlusion_map, restore_map
from labelloop_app.geometry import Geometry, geometry_from_ras_affine
from labelloop_app.infer_classification import class_probabilities
from labelloop_app.networks import CAM_LAYERS, classification_network
from labelloop_app.synthetic import CLASS_LABEL_DIR, class_label_document, make_lesion_phantom
from labelloop_app.train_classification import class_weights, stratified_split
from labelloop_app.train_detector import DetectorTrain
from labelloop_app.transforms import whole_volume_transforms

CLASSES = ["normal", "lesion"]


# --- configuration --------------------------------------------------------------------------------------------


def test_classification_is_a_task():
    assert "classification" in TASKS
    assert parse_tasks("segmentation,classification") == ["segmentation", "classification"]
    assert parse_tasks("classification") == ["classification"]


def test_classification_conf_defaults_and_overrides(tmp_path):
    c = ClassificationConf.from_conf({})
    assert c.classes == ("normal", "lesion") and c.network == "densenet121"
    assert c.spatial_size == (96, 96, 64) and c.target_spacing == (3.5, 3.5, 3.5)
    assert c.index_of == {"normal": 0, "lesion": 1} and c.body_threshold == -500.0
    c = ClassificationConf.from_conf({"cls_network": "resnet", "classes": "a,b,c", "cls_size": "64,64,32"})
    assert c.network == "resnet10" and c.classes == ("a", "b", "c") and c.spatial_size == (64, 64, 32)
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(["benign", "malignant"]))
    assert ClassificationConf.from_conf({"classes": str(path), "cls_network": "ResNet-18"}).classes == (
        "benign",
        "malignant",
    )
    assert ClassificationConf.from_conf({"modality": "MRI"}).body_threshold == 0.0


@pytest.mark.parametrize(
    "conf,words",
    [({"cls_network": "vgg"}, ["cls_network", "densenet121"]), ({"classes": "only"}, ["classes", "two distinct"])],
)
def test_bad_classification_conf_is_refused(conf, words):
    with pytest.raises(ConfError) as e:
        ClassificationConf.from_conf(conf)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("name", ["densenet121", "resnet10", "resnet18"])
def test_classification_networks_give_one_logit_per_class_and_have_a_cam_layer(name):
    net = classification_network(name, 3).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3)
    assert CAM_LAYERS[name] in dict(net.named_modules())


# --- metrics and sampling -------------------------------------------------------------------------------------


def test_classification_report_values():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1, 0])
    r = classification_report(probs, labels, CLASSES)
    assert r["confusion_matrix"] == [[2, 0], [1, 2]]  # rows: true class, columns: predicted
    assert r["accuracy"] == pytest.approx(0.8)
    assert r["sensitivity"] == {"normal": 1.0, "lesion": pytest.approx(2 / 3, abs=1e-6)}
    assert r["specificity"] == {"normal": pytest.approx(2 / 3, abs=1e-6), "lesion": 1.0}
    assert r["precision"] == {"normal": pytest.approx(2 / 3, abs=1e-6), "lesion": 1.0}
    assert r["f1"] == {"normal": pytest.approx(0.8, abs=1e-6), "lesion": pytest.approx(0.8, abs=1e-6)}
    assert r["balanced_accuracy"] == pytest.approx((1.0 + 2 / 3) / 2, abs=1e-6)
    # AUC by counting: lesion scores 0.8, 0.4, 0.7 against normal 0.1, 0.45 -> 5 of 6 pairs ranked right
    assert r["auc"] == pytest.approx(5 / 6)
    assert selection_score(r) == pytest.approx(5 / 6 + 1e-3 * np.mean([0.9, 0.8, 0.4, 0.7, 0.55]))


def test_classification_report_with_a_missing_class_and_empty_set():
    r = classification_report(np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]), CLASSES)
    assert r["auc"] is None and r["sensitivity"]["lesion"] is None and r["accuracy"] == 0.5
    assert r["balanced_accuracy"] == 0.5  # over the classes present
    assert selection_score(r) == pytest.approx(0.5 + 1e-3 * 0.55)  # falls back to accuracy
    empty = classification_report(np.zeros((0, 2)), np.zeros(0), CLASSES)
    assert empty["n"] == 0 and empty["accuracy"] is None and empty["confusion_matrix"] == [[0, 0], [0, 0]]


def test_ignite_metric_puts_scalars_in_engine_state_and_drops_undefined_ones():
    batches = [
        [{"pred": torch.tensor([0.9, 0.1]), "label": torch.tensor(0)}],
        [{"pred": torch.tensor([0.3, 0.7]), "label": torch.tensor(1)}],
    ]
    engine = Engine(lambda e, batch: batch)
    metric = ClassificationMetrics(CLASSES, "val_")
    metric.attach(engine, "val_score")
    engine.run(batches, max_epochs=1)
    m = engine.state.metrics
    assert m["val_accuracy"] == 1.0 and m["val_balanced_accuracy"] == 1.0 and m["val_auc"] == 1.0
    assert m["val_score"] == pytest.approx(1.0 + 1e-3 * 0.8)
    assert metric.report["confusion_matrix"] == [[1, 0], [0, 1]]
    engine.run(batches[:1], max_epochs=1)  # one class only: no AUC, and no stale one
    assert "val_auc" not in engine.state.metrics and engine.state.metrics["val_accuracy"] == 1.0


def test_class_weights_draw_every_class_equally():
    labels = [0, 0, 0, 1]
    w = class_weights(labels, 2)
    assert w.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert sum(w[np.array(labels) == 0]) == pytest.approx(sum(w[np.array(labels) == 1]))


def test_stratified_split_validates_every_class():
    data = [{"image": f"i{i}", "label": y} for i, y in enumerate([1, 1, 1, 1, 0, 0, 2])]
    train, val = stratified_split(data, 0.2)
    assert sorted(d["label"] for d in val) == [0, 1]  # one of each class with two or more images
    assert len(train) + len(val) == len(data) and {d["image"] for d in train}.isdisjoint(d["image"] for d in val)
    assert stratified_split(data, 0.0) == (data, [])


def test_class_probabilities_sum_to_one():
    p = class_probabilities(torch.softmax(torch.tensor([0.3, -1.2, 2.0]), dim=0))
    assert p.dtype == np.float64 and p.sum() == pytest.approx(1.0, abs=1e-12)


# --- class labels and the datastore ---------------------------------------------------------------------------


def test_class_label_files_and_info(tmp_path):
    path = tmp_path / "a.json"
    write_class_label(str(path), "lesion")
    assert json.loads(path.read_text()) == {"class": "lesion"} and read_class_label(str(path)) == "lesion"
    path.write_text("")
    assert read_class_label(str(path)) is None
    path.write_text("not json")
    with pytest.raises(ValueError, match="JSON"):
        read_class_label(str(path))
    assert class_from_info({"label_info": {"class": "normal"}}) == "normal"
    assert class_from_info({"class": "lesion"}) == "lesion"
    assert class_from_info({"label_info": [{"name": "liver", "idx": 1}]}) is None


def test_findings_are_validated_and_canonical():
    marks = parse_findings([{"centre_lps": [1, "2.5", -3.00049], "radius_mm": 4}])
    assert marks == [{"centre_lps": [1.0, 2.5, -3.0], "radius_mm": 4.0}]
    assert parse_findings(None) is None and parse_findings([]) == []
    bad = [
        ({"centre_lps": [0, 0, 0], "radius_mm": 1}, "must be a list"),
        ([{"centre_lps": [0, 0, 0], "radius_mm": 1}] * 101, "at most 100"),
        ([{"centre_lps": [0, 0, 0]}], "finding 0 must be exactly"),
        ([{"centre_lps": [0, 0, 0], "radius_mm": 1, "label": "x"}], "finding 0 must be exactly"),
        ([{"centre_lps": [0, 0, 0], "radius_mm": 1}, {"centre_lps": [0, 0], "radius_mm": 1}], "finding 1"),
        ([{"centre_lps": [0, float("nan"), 0], "radius_mm": 1}], "3 finite numbers"),
        ([{"centre_lps": "0,0,0", "radius_mm": 1}], "3 finite numbers"),
        ([{"centre_lps": [0, 0, 0], "radius_mm": 0}], "(0, 500]"),
        ([{"centre_lps": [0, 0, 0], "radius_mm": "5"}], "(0, 500]"),
        ([{"centre_lps": [0, 0, 0], "radius_mm": True}], "(0, 500]"),
    ]
    for raw, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            parse_findings(raw)


def test_class_label_files_round_trip_findings(tmp_path):
    path = tmp_path / "a.json"
    marks = [{"centre_lps": [1.0, 2.0, 3.0], "radius_mm": 4.0}]
    write_class_label(str(path), "lesion", marks)
    assert json.loads(path.read_text()) == {"class": "lesion", "findings": marks}
    assert read_class_document(str(path)) == ("lesion", marks)
    write_class_label(str(path), "normal")
    assert read_class_document(str(path)) == ("normal", None)
    path.write_text(json.dumps({"class": "lesion", "findings": [{"centre_lps": [1, 2], "radius_mm": 1}]}))
    with pytest.raises(ValueError, match="centre_lps"):
        read_class_document(str(path))
    assert findings_from_info({"label_info": {"findings": marks}}) == marks == findings_from_info({"findings": marks})
    assert findings_from_info({"label_info": {"class": "lesion"}}) is None


def test_findings_outside_uses_the_image_grid():
    # a 10 x 20 x 5 grid of 2 mm voxels, axes permuted and flipped: index (i, j, k) sits at origin + D (2i, 2j, 2k)
    direction = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    grid = Geometry((10, 20, 5), (2.0, 2.0, 2.0), (100.0, 50.0, -10.0), direction)
    inside = {"centre_lps": [100.0 - 2 * 19, 50.0 + 2 * 9, -10.0 + 2 * 4], "radius_mm": 1.0}  # the far corner voxel
    beyond_x = {"centre_lps": [100.0 + 2.0, 50.0, -10.0], "radius_mm": 1.0}  # j = -1
    beyond_z = {"centre_lps": [100.0, 50.0, -10.0 + 2 * 5], "radius_mm": 1.0}  # k = 5
    assert findings_outside([inside, beyond_x, beyond_z], grid) == [1, 2]


def test_generator_class_labels_carry_the_lesion_as_a_finding():
    truth = {"class": "lesion", "lesion_radius_mm": 6.5, "centre": [-80.0, 1.0, 30.0]}
    assert class_label_document("lesion", truth) == {
        "class": "lesion",
        "findings": [{"centre_lps": [-80.0, 1.0, 30.0], "radius_mm": 6.5}],
    }
    assert class_label_document("normal", {"class": "normal", "lesion_radius_mm": 0.0, "centre": None}) == {
        "class": "normal",
        "findings": [],
    }
    assert class_label_document("normal", None) == {"class": "normal"}


def test_slicer_points_become_lps_findings():
    from LabelLoopLib.workflow import finding_from_ras

    assert finding_from_ras([10.0, -20.0, 30.0], 5) == {"centre_lps": [-10.0, 20.0, 30.0], "radius_mm": 5.0}


def _tiny_studies(root: Path, n: int = 3) -> Path:
    studies = root / "studies"
    studies.mkdir()
    for i in range(n):
        image = sitk.Image([8, 8, 8], sitk.sitkInt16)
        sitk.WriteImage(image, str(studies / f"img_{i}.nii.gz"))
    return studies


def _datastore(studies: Path, check=ClassLabelCheck(CLASSES)) -> LabelLoopDatastore:
    return LabelLoopDatastore(
        str(studies), extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False, class_check=check
    )


def test_datastore_stores_validates_and_rediscovers_class_labels(tmp_path):
    studies = _tiny_studies(tmp_path)
    ds = _datastore(studies)
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps({"class": "lesion"}))
    ds.save_label("img_0", str(upload), CLASS_TAG, {"label_info": {"class": "lesion"}})
    upload.write_text("")
    ds.save_label("img_1", str(upload), CLASS_TAG, {"label_info": {"class": "normal"}})
    assert class_labels_of(ds) == {"img_0": "lesion", "img_1": "normal"}
    assert ds.get_labeled_images() == []  # no 'final' label: segmentation sees nothing
    assert ds.datalist() == []
    summary = class_summary(ds, CLASSES)
    assert summary["counts"] == {"normal": 1, "lesion": 1} and summary["unlabeled"] == 1 and summary["total"] == 3

    before = snapshot(studies)
    upload.write_text(json.dumps({"class": "tumour"}))
    with pytest.raises(UnprocessableInput, match="valid classes: normal, lesion"):
        ds.save_label("img_2", str(upload), CLASS_TAG, {})
    assert snapshot(studies) == before and "img_2" not in class_labels_of(ds)

    # findings: stored in the file and the info, counted by the listing; one outside the 8 mm cube is refused
    marks = [{"centre_lps": [3.0, 4.0, 7.0], "radius_mm": 2.0}]
    upload.write_text(json.dumps({"class": "lesion", "findings": marks}))
    ds.save_label("img_0", str(upload), CLASS_TAG, {})
    assert class_findings_of(ds) == {"img_0": marks}
    assert class_summary(ds, CLASSES)["findings"] == {"img_0": 1}
    before = snapshot(studies)
    upload.write_text(json.dumps({"class": "lesion", "findings": [*marks, {"centre_lps": [3, 4, 8], "radius_mm": 1}]}))
    with pytest.raises(UnprocessableInput, match=r"finding 1 of image 'img_0' lies outside the image"):
        ds.save_label("img_0", str(upload), CLASS_TAG, {})
    assert snapshot(studies) == before and class_findings_of(ds) == {"img_0": marks}

    # the JSON files alone are enough: a fresh datastore without datastore_v2.json reads them back
    (studies / "datastore_v2.json").unlink()
    (studies / "labels" / "class" / "img_2.json").write_text(json.dumps({"class": "unknown"}))  # skipped
    fresh = _datastore(studies)
    assert class_labels_of(fresh) == {"img_0": "lesion", "img_1": "normal"}
    assert class_findings_of(fresh) == {"img_0": marks}


def test_class_labels_need_the_classification_task(tmp_path):
    studies = _tiny_studies(tmp_path, 1)
    ds = _datastore(studies, check=None)
    upload = tmp_path / "upload.json"
    upload.write_text(json.dumps({"class": "lesion"}))
    before = snapshot(studies)
    with pytest.raises(BadRequest, match="--conf tasks classification"):
        ds.save_label("img_0", str(upload), CLASS_TAG, {})
    assert snapshot(studies) == before


def test_generator_writes_class_labels_where_the_server_reads_them():
    assert CLASS_LABEL_DIR.parts[-2:] == ("labels", CLASS_TAG)


# --- whole-volume transforms and explanation maps -------------------------------------------------------------


def _preprocess(image_path: Path, size=(64, 64, 32), spacing=(6.0, 6.0, 6.0)):
    data = {"image": str(image_path)}
    for t in whole_volume_transforms("image", "CT", (-175.0, 250.0), spacing, size, -500.0):
        data = t(data)
    return data


def test_a_map_on_the_network_grid_lands_on_the_right_spot_of_the_input_grid(tmp_path):
    """A blob put at the lesion centre on the network grid (after RAS, resampling, body crop and pad) comes back
    at the lesion centre on the input grid of an oblique LAS image."""
    image, info = make_lesion_phantom(21, lesion=True, small=True, orientation="LAS", oblique_deg=12.0)
    path = tmp_path / "in.nii.gz"
    sitk.WriteImage(image, str(path))
    data = _preprocess(path)
    assert tuple(data["image"].shape[1:]) == (64, 64, 32)
    source = geometry_from_ras_affine(np.asarray(data["image"].affine), (64, 64, 32))
    idx = np.array(source.reference_image().TransformPhysicalPointToContinuousIndex(info["centre"]))
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in (64, 64, 32)], indexing="ij"), axis=-1)
    blob = np.exp(-(((grid - idx) ** 2).sum(-1)) / 2.0).astype(np.float32)

    restored = restore_map(blob, source, data["image_geometry"])
    assert Geometry.of(restored).mismatches(Geometry.of(image)) == []
    assert restored.GetPixelID() == sitk.sitkFloat32
    arr = sitk.GetArrayFromImage(restored)
    peak = np.unravel_index(np.argmax(arr), arr.shape)[::-1]  # (x, y, z) index
    where = np.array(restored.TransformIndexToPhysicalPoint([int(v) for v in peak]))
    assert np.linalg.norm(where - np.array(info["centre"])) < 1.5 * max(image.GetSpacing())


def test_gradcam_map_is_on_the_input_grid_in_unit_range_and_leaves_the_model_alone(tmp_path):
    image, _ = make_lesion_phantom(22, lesion=True, small=True)
    path = tmp_path / "in.nii.gz"
    sitk.WriteImage(image, str(path))
    x = _preprocess(path)["image"].as_tensor()
    net = classification_network("densenet121", 2).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cam = gradcam_map(net, x, 1, CAM_LAYERS["densenet121"])
    assert cam.shape == (64, 64, 32) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    layer = dict(net.named_modules())[CAM_LAYERS["densenet121"]]
    assert not layer._forward_hooks and not layer._backward_hooks and layer.inplace  # hooks went on a copy
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    "value,method",
    [(None, None), (False, None), ("false", None), (True, "gradcam"), ("1", "gradcam"), ("occlusion", "occlusion")],
)
def test_explain_parameter(value, method):
    assert explain_method(value) == method


def test_unknown_explain_method_is_refused():
    with pytest.raises(ValueError, match="gradcam"):
        explain_method("lime")


class _CornerDetector(torch.nn.Module):
    """Class 1's logit grows with the mean intensity of one corner of the volume."""

    def forward(self, x):
        s = x[:, :, :8, :8, :8].mean(dim=(1, 2, 3, 4))
        return torch.stack([-s, s], dim=1) * 2.0


def test_occlusion_map_is_the_probability_drop_where_the_evidence_is():
    image = torch.zeros(1, 32, 32, 16)
    image[:, :8, :8, :8] = 1.0
    net = _CornerDetector()
    probability = float(torch.softmax(net(image[None]), dim=1)[0, 1])
    drop = occlusion_map(net, image, 1, probability, mask_fraction=0.25)
    assert drop.shape == (32, 32, 16) and drop.dtype == np.float32
    assert drop[:8, :8, :8].mean() > 1e-3  # hiding the corner lowers p(class 1): a softmax probability, ...
    assert np.abs(drop[16:, 16:, 8:]).max() < 1e-5  # ... and hiding anything else changes nothing


# --- the detector ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation,oblique", [("LPS", 0.0), ("LAS", 12.0)])
def test_findings_are_painted_on_the_lesion_of_the_preprocessed_image(tmp_path, orientation, oblique):
    image, info = make_lesion_phantom(
        5,
        lesion=True,
        small=True,
        orientation=orientation,
        oblique_deg=oblique,
        lesion_radius_mm=15.0,
        lesion_contrast_hu=-80.0,
    )
    path = tmp_path / "in.nii.gz"
    sitk.WriteImage(image, str(path))
    data = _preprocess(path)
    finding = {"centre_lps": info["centre"], "radius_mm": 15.0}
    data = FindingsToMaskd()({**data, "findings": [finding], "class_index": 1})
    mask = data["label"][0].numpy()
    assert set(np.unique(mask)) == {0, 1} and data["label"].shape == data["image"].shape
    assert 30 < mask.sum() < 130  # a 15 mm ball on 6 mm voxels: 4/3 pi 2.5^3 = 65 voxels
    x = data["image"][0].numpy()
    shell = ndimage.binary_dilation(mask > 0, iterations=2) & (mask == 0)
    assert x[mask > 0].mean() < x[shell].mean() - 0.08  # the ball sits on the dark lesion (80 HU = 0.19 units)
    normal = FindingsToMaskd()({**data, "findings": [finding], "class_index": 0})
    assert normal["label"].sum() == 0  # the first class marks nothing


def test_image_probabilities_come_from_the_most_probable_voxels():
    logits = torch.zeros(2, 8, 8, 8)
    assert image_probabilities(logits).tolist() == pytest.approx([0.5, 0.5])
    logits[1, 2:4, 2:4, 2:4] = 6.0  # 8 voxels sure of class 1
    p = image_probabilities(logits)
    assert float(p.sum()) == pytest.approx(1.0) and float(p[1]) > 0.99
    three = torch.zeros(3, 4, 4, 4)
    three[2, 0, 0, :] = 5.0
    p = image_probabilities(three, top_k=4)
    assert int(p.argmax()) == 2 and float(p.sum()) == pytest.approx(1.0)
    label = torch.zeros(1, 4, 4, 4)
    assert PatchClassd(keys="label")({"label": label})["label"].tolist() == [0]
    label[0, 1, 1, 1] = 2
    assert PatchClassd(keys="label")({"label": label})["label"].tolist() == [2]


def test_detector_network_maps_every_class():
    net = classification_network("detector", 3).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_evidence_bias_is_the_balanced_maximum_likelihood_offset():
    """With all positives at logit a and all negatives at logit c, the balanced likelihood peaks where
    sigmoid(c + b) = 1 - sigmoid(a + b), that is b = -(a + c) / 2, whatever the group sizes."""
    a, c = _logit(0.98), _logit(0.5)
    evidence = np.array([0.98] * 3 + [0.5] * 9)
    positive = np.array([True] * 3 + [False] * 9)
    assert fit_evidence_bias(evidence, positive) == pytest.approx(-(a + c) / 2, abs=1e-6)
    spread = np.array([0.9, 0.99, 0.7, 0.3, 0.6, 0.45])
    b = fit_evidence_bias(spread, np.array([True, True, True, False, False, False]))
    p = 1 / (1 + np.exp(-(np.log(spread / (1 - spread)) + b)))
    assert p[:3].mean() == pytest.approx(1 - p[3:].mean(), abs=1e-6)  # the balanced score equation
    with pytest.raises(ValueError, match="with and without"):
        fit_evidence_bias(spread, np.ones(6, dtype=bool))


def test_evidence_bias_calibrates_the_image_probabilities():
    logits = torch.zeros(2, 8, 8, 8)
    logits[1, :2, :2, :2] = _logit(0.8)  # 8 voxels at 0.8: evidence 0.8
    assert float(image_probabilities(logits)[1]) == pytest.approx(0.8, abs=1e-5)
    p = image_probabilities(logits, torch.tensor([-_logit(0.8)]))
    assert p.tolist() == pytest.approx([0.5, 0.5], abs=1e-5)
    out = ImageProbabilitiesd(keys="pred")({"pred": logits, "evidence_bias": torch.tensor([-2 * _logit(0.8)])})
    assert float(out["evidence"][0]) == pytest.approx(0.8, abs=1e-5)
    assert float(out["pred"][1]) == pytest.approx(0.2, abs=1e-5) and float(out["pred"].sum()) == pytest.approx(1.0)


def test_class_map_unet_saves_its_bias_and_loads_older_weights_without_one():
    net = ClassMapUNet(3, spatial_dims=3, in_channels=1, channels=(4, 8), strides=(2,), num_res_units=1)
    net.evidence_bias.copy_(torch.tensor([-1.5, 0.25]))
    state = net.state_dict()
    again = ClassMapUNet(3, spatial_dims=3, in_channels=1, channels=(4, 8), strides=(2,), num_res_units=1)
    again.load_state_dict(state, strict=True)
    assert again.evidence_bias.tolist() == [-1.5, 0.25]
    older = {k: v for k, v in state.items() if k not in ("evidence_bias", "patch_size")}
    again.load_state_dict(older, strict=True)
    assert again.evidence_bias.tolist() == [0.0, 0.0] and int(again.patch_size) == LEGACY_PATCH == 48


class _WindowSizes(torch.nn.Module):
    """Records the spatial size of every input it sees; outputs two channels of the input."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.register_buffer("patch_size", torch.tensor(patch_size))
        self.seen = set()

    def forward(self, x):
        self.seen.add(tuple(x.shape[2:]))
        return torch.cat([x, 2 * x], dim=1)


def test_patch_window_inferer_sees_the_volume_in_training_patches():
    """Instance normalisation is computed per input: the detector must see windows of the size it was trained on,
    the network's own ``patch_size`` unless the trainer names one, and the result still covers the whole volume."""
    volume = torch.rand(1, 1, 40, 36, 30)
    net = _WindowSizes(16)
    out = PatchWindowInferer()(volume, net)
    assert net.seen == {(16, 16, 16)} and out.shape == (1, 2, 40, 36, 30)
    assert torch.allclose(out[:, 1], 2 * volume[:, 0], atol=1e-5)  # a voxel-wise network: windows blend to the same
    net.seen.clear()
    PatchWindowInferer(20)(volume, net)
    assert net.seen == {(20, 20, 20)}
    net.seen.clear()
    wrapped = torch.nn.Module()  # as DistributedDataParallel holds the network in multi-GPU training
    wrapped.module = net
    wrapped.forward = net.forward
    PatchWindowInferer()(volume, wrapped)
    assert net.seen == {(16, 16, 16)}


def test_evidence_calibration_fits_each_finding_class_before_the_checkpoint():
    """Over one validation epoch the handler gathers evidence and classes, fits one offset per finding class
    (against the first class's images only), stores it in the network and rescores with it."""
    net = ClassMapUNet(3, spatial_dims=3, in_channels=1, channels=(4, 8), strides=(2,), num_res_units=1)
    items = [(0, [0.5, 0.5]), (0, [0.5, 0.5]), (1, [0.98, 0.1]), (2, [0.9, 0.9]), (2, [0.4, 0.9])]

    def step(engine, batch):
        label, evidence = batch
        return [{"label": torch.tensor([label]), "evidence": torch.tensor(evidence)}]

    rescored = {}
    evaluator = Engine(step)
    EvidenceCalibration(net, lambda engine, probs: rescored.update(probs=probs)).attach(evaluator)
    evaluator.run(items, max_epochs=1)
    b1 = fit_evidence_bias(np.array([0.5, 0.5, 0.98]), np.array([False, False, True]))
    b2 = fit_evidence_bias(np.array([0.5, 0.5, 0.9, 0.9]), np.array([False, False, True, True]))
    assert net.evidence_bias.tolist() == pytest.approx([b1, b2], abs=1e-5)
    assert rescored["probs"].shape == (5, 3) and np.allclose(rescored["probs"].sum(axis=1), 1.0)
    assert rescored["probs"][2].argmax() == 1 and rescored["probs"][0].argmax() == 0
    assert int(net.patch_size) == DEFAULT_PATCH  # the training patch travels with the calibration
    EvidenceCalibration(net, patch=24).attach(evaluator)
    evaluator.run(items, max_epochs=1)
    assert int(net.patch_size) == 24


def test_classification_metrics_rescore_replaces_the_epoch_figures():
    metric = ClassificationMetrics(CLASSES, "val_")
    engine = Engine(lambda e, b: None)
    metric.update(([torch.tensor([0.4, 0.6]), torch.tensor([0.3, 0.7])], [torch.tensor([0]), torch.tensor([1])]))
    metric.completed(engine, "val_score")
    assert engine.state.metrics["val_accuracy"] == 0.5
    metric.rescore(engine, "val_score", np.array([[0.6, 0.4], [0.3, 0.7]]))
    assert engine.state.metrics["val_accuracy"] == 1.0 and engine.state.metrics["val_auc"] == 1.0


def test_detector_centres_patches_without_findings_in_tissue_above_minus_50_hu(tmp_path):
    """The threshold of the patch centres without findings is -50 HU after the detector's own intensity pipeline."""
    conf = ClassificationConf.from_conf({"cls_network": "detector"})
    task = DetectorTrain(conf, str(tmp_path), classification_network("detector", 2), str(tmp_path / "m.pt"))
    threshold = task._tissue_threshold()
    image = sitk.Image([12, 12, 12], sitk.sitkFloat32) - 50.0
    path = tmp_path / "minus50.nii.gz"
    sitk.WriteImage(image, str(path))
    pipeline = [*whole_volume_transforms("image", "CT", conf.ct_window, (1, 1, 1), (12, 12, 12), -1000.0)]
    d = {"image": str(path)}
    for t in [*pipeline, *detector_input_transforms(conf)]:
        d = t(d)
    assert threshold["image_key"] == "image"
    assert float(d["image"].max()) == pytest.approx(threshold["image_threshold"], abs=1e-4)
    mr = DetectorTrain(
        ClassificationConf.from_conf({"cls_network": "detector", "modality": "MR"}),
        str(tmp_path),
        classification_network("detector", 2),
        str(tmp_path / "m.pt"),
    )
    assert mr._tissue_threshold() == {}


class _Brightness(torch.nn.Module):
    """Two-class voxel logits whose finding channel is the input itself: the brightest voxels are the likeliest."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), x], dim=1)


def test_hard_negatives_are_where_the_network_is_surest_of_a_finding():
    image = torch.zeros(1, 12, 10, 8)
    image[0, 7, 2, 5] = 5.0
    image[0, 1, 8, 1] = 4.0
    hard = HardNegatives(voxels=2)
    network = _Brightness().train()
    hard.refresh(network, {"n1": image}, PatchWindowInferer(8))
    expected = {int(np.ravel_multi_index(v, (12, 10, 8))) for v in [(7, 2, 5), (1, 8, 1)]}
    assert set(hard.indices["n1"].tolist()) == expected
    assert network.training  # left as it was found


def test_patches_of_images_without_findings_centre_on_their_hard_negatives():
    """A normal image's patch is centred at one of its hard negatives with the given probability; images with
    findings and images not yet mapped keep their tissue indices."""
    from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld

    shape = (20, 20, 20)
    hard = HardNegatives()
    hard.indices["n1"] = np.array([int(np.ravel_multi_index((15, 4, 9), shape))])
    pipeline = Compose(
        [
            FgBgToIndicesd(keys="label"),
            HardNegativeIndicesd(hard, prob=1.0),
            RandCropByPosNegLabeld(
                keys=("image", "label"),
                label_key="label",
                spatial_size=[3, 3, 3],
                pos=1,
                neg=1,
                num_samples=1,
                fg_indices_key="label_fg_indices",
                bg_indices_key="label_bg_indices",
            ),
        ]
    ).set_random_state(0)
    values = torch.arange(np.prod(shape), dtype=torch.float32).reshape(1, *shape)  # a voxel's value is its index

    def centres(image_id: str, class_index: int, draws: int = 20) -> set:
        item = {"image": values, "label": torch.zeros(1, *shape), "image_id": image_id, "class_index": class_index}
        return {int(pipeline(item)[0]["image"][0, 1, 1, 1]) for _ in range(draws)}

    assert centres("n1", 0) == set(hard.indices["n1"].tolist())
    assert len(centres("n2", 0)) > 1  # not mapped yet: anywhere
    assert len(centres("n1", 1)) > 1  # an image with findings is never steered
    never = HardNegativeIndicesd(hard, prob=0.0)
    assert "label_bg_indices" not in never({"image_id": "n1", "class_index": 0})
