"""The ``classification`` task driven over HTTP through a real ``monailabel start_server`` subprocess.

One server serves both tasks over one studies folder: tiny lesion phantoms from the sample-data generator (some
with class labels, written by the generator in the server's convention) next to two segmentation phantoms with
``final`` labels.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch

from conftest import (
    FAST_CONF,
    assert_same_geometry,
    datastore_json,
    run_cli,
    snapshot,
    start_server,
    stop_server,
)
from labelloop_app.synthetic import generate_sample_data, make_lesion_phantom
from labelloop_app.uncertainty import MEASURES
from LabelLoopLib.client import LabelLoopClient
from LabelLoopLib.workflow import curve_columns, training_from_stats

CLASSES = ["normal", "lesion"]
CLS_CONF = {
    **FAST_CONF,
    "tasks": "segmentation,classification",
    "cls_size": "64,64,32",
    "cls_spacing": "6,6,6",
    "cls_batch_size": "2",
    "auto_scoring": "false",
}
UNLABELED = "lesion_009"
FAR = {"centre_lps": [1e5, 0.0, 0.0], "radius_mm": 5.0}  # a finding 100 m away from any image


@pytest.fixture(scope="session")
def cls_sample(tmp_path_factory) -> Path:
    """Tiny sample data: 10 lesion phantoms (6 with class labels) and 2 segmentation phantoms (2 final labels)."""
    sample = tmp_path_factory.mktemp("cls_sample") / "sample"
    generate_sample_data(
        sample,
        n_seg=2,
        n_seg_labeled=2,
        n_seg_heldout=0,
        n_cls=10,
        n_cls_labeled=6,
        n_cls_heldout=0,
        seed=11,
        small=True,
        progress=False,
        workers=1,
    )
    return sample


@pytest.fixture(scope="session")
def cls_server(cls_sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("cls_server")
    studies = shutil.copytree(cls_sample / "classification", root / "studies")
    for image in (cls_sample / "segmentation").glob("*.nii.gz"):
        shutil.copy(image, studies / image.name)
    shutil.copytree(cls_sample / "segmentation" / "labels" / "final", studies / "labels" / "final")
    server = start_server(studies, root / "models", root / "server.log", CLS_CONF)
    yield server
    stop_server(server)


@dataclass
class ClsTrained:
    server: object
    before_training: requests.Response
    stats: dict


@pytest.fixture(scope="session")
def cls_trained(cls_server) -> ClsTrained:
    before = cls_server.post(f"/infer/classification?image={UNLABELED}&output=json")
    r = cls_server.post("/train/classification", json={"max_epochs": 2})
    assert r.status_code == 200, r.text
    task = cls_server.wait_task("train", timeout=600)
    assert task["status"] == "DONE", f"{task}\n{cls_server.log_tail()}"
    return ClsTrained(cls_server, before, cls_server.info()["train_stats"]["classification"])


def put_class(server, image_id: str, tmp_path: Path, file_doc=None, params=None, name: str = "label.json"):
    path = tmp_path / name
    path.write_text("" if file_doc is None else json.dumps(file_doc))
    with open(path, "rb") as f:
        return server.put(
            f"/datastore/label?image={image_id}&tag=class",
            files={"label": (f"{image_id}.json" if name == "label.json" else name, f)},
            data={"params": json.dumps(params or {})},
        )


def test_info_lists_both_tasks(cls_server):
    info = cls_server.info()
    cls = info["models"]["classification"]
    assert cls["type"] == "classification"
    assert cls["labels"] == {"normal": 0, "lesion": 1}
    assert cls["config"]["network"] == "densenet121"
    assert {"segmentation", "classification"} <= set(info["trainers"])
    assert info["models"]["segmentation"]["type"] == "segmentation"


def test_generator_class_labels_are_served(cls_server, cls_sample):
    labeled = json.loads((cls_sample / "classification_labeled.json").read_text())
    listing = cls_server.get("/labelloop/classes").json()
    assert listing["classes"] == CLASSES
    assert listing["labels"] == labeled
    assert listing["counts"] == {c: sum(v == c for v in labeled.values()) for c in CLASSES}
    assert set(labeled.values()) == set(CLASSES)  # the generator labels both classes
    assert listing["labeled"] == 6 and listing["total"] == 12 and listing["unlabeled"] == 6
    objects = datastore_json(cls_server.studies)["objects"]
    truth = json.loads((cls_sample / "classification_truth.json").read_text())
    for image_id, name in labeled.items():
        info = objects[image_id]["labels"]["class"]["info"]
        assert info["class"] == name
        assert "final" not in objects[image_id]["labels"]
        # the generator marks each labeled lesion as a finding at its true centre; normal cases mark none
        marks = (
            []
            if name == "normal"
            else [{"centre_lps": truth[image_id]["centre"], "radius_mm": truth[image_id]["lesion_radius_mm"]}]
        )
        assert info["findings"] == marks
        assert listing["findings"][image_id] == len(marks)


def test_class_label_submitted_listed_downloaded_and_removed(cls_server, tmp_path):
    client = LabelLoopClient(cls_server.url)
    doc = tmp_path / f"{UNLABELED}.json"
    doc.write_text(json.dumps({"class": "lesion"}))
    client.save_label(UNLABELED, str(doc), tag="class", label_info={"class": "lesion"})
    stored = cls_server.studies / "labels" / "class" / f"{UNLABELED}.json"
    assert json.loads(stored.read_text()) == {"class": "lesion"}
    assert cls_server.get("/labelloop/classes").json()["labels"][UNLABELED] == "lesion"
    r = cls_server.get(f"/datastore/label?label={UNLABELED}&tag=class")
    assert r.status_code == 200 and json.loads(r.content) == {"class": "lesion"}

    # the class alone in label_info (empty file) is enough, and replaces the previous class
    r = put_class(cls_server, UNLABELED, tmp_path, None, {"label_info": {"class": "normal"}})
    assert r.status_code == 200, r.text
    assert json.loads(stored.read_text()) == {"class": "normal"}
    assert cls_server.get("/labelloop/classes").json()["labels"][UNLABELED] == "normal"

    assert cls_server.delete(f"/datastore/label?id={UNLABELED}&tag=class").status_code == 200
    assert UNLABELED not in cls_server.get("/labelloop/classes").json()["labels"]
    assert not stored.exists()


@pytest.mark.parametrize(
    "image_id,file_doc,params,name,status,words",
    [
        (UNLABELED, {"class": "tumour"}, None, "label.json", 422, ["unknown class 'tumour'", "normal, lesion"]),
        (UNLABELED, {}, {"label_info": {"class": "cyst"}}, "label.json", 422, ["unknown class 'cyst'", "normal"]),
        (UNLABELED, {}, None, "label.json", 422, ["names no class", "valid classes: normal, lesion"]),
        (UNLABELED, {"class": "lesion"}, {"label_info": {"class": "normal"}}, "label.json", 422, ["but 'normal'"]),
        (UNLABELED, None, None, "mask.nii.gz", 422, ["cannot read the class label"]),
        ("no_such_image", {"class": "lesion"}, None, "label.json", 404, ["'no_such_image' is not in the datastore"]),
        (
            UNLABELED,
            {"class": "lesion", "findings": [FAR]},
            None,
            "label.json",
            422,
            ["finding 0", "outside the image"],
        ),
        (UNLABELED, {"class": "lesion"}, {"findings": [{"centre_lps": [0, 0]}]}, "label.json", 422, ["exactly"]),
        (UNLABELED, {"class": "lesion", "findings": [{**FAR, "radius_mm": 0}]}, None, "label.json", 422, ["(0, 500]"]),
        (UNLABELED, {"class": "lesion", "findings": []}, {"findings": [FAR]}, "label.json", 422, ["other findings"]),
    ],
)
def test_bad_class_label_rejected_and_datastore_unchanged(
    cls_server, tmp_path, image_id, file_doc, params, name, status, words
):
    before = snapshot(cls_server.studies)
    if name.endswith(".nii.gz"):  # an image sent as a class label
        shutil.copy(cls_server.studies / f"{image_id}.nii.gz", tmp_path / name)
        with open(tmp_path / name, "rb") as f:
            r = cls_server.put(f"/datastore/label?image={image_id}&tag=class", files={"label": (name, f)})
    else:
        r = put_class(cls_server, image_id, tmp_path, file_doc, params)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"], r.json()["detail"]
    assert snapshot(cls_server.studies) == before


def test_inference_before_training_is_a_clear_409(cls_trained):
    r = cls_trained.before_training
    assert r.status_code == 409 and "not been trained yet" in r.json()["detail"]


def test_training_stats_have_every_metric_per_epoch(cls_trained):
    stats = cls_trained.stats
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2
    assert stats["classes"] == CLASSES and stats["network"] == "densenet121"
    assert stats["train_images"] + stats["val_images"] == 6  # class labels only: no segmentation phantom
    assert stats["val_images"] == 2  # stratified: one image of each class
    assert sum(stats["class_counts"].values()) == 6
    assert [h["epoch"] for h in stats["history"]] == [1, 2]
    for h in stats["history"]:
        assert h["loss"] > 0 and h["seconds"] > 0
        for prefix in ("train_", "val_"):
            assert 0.0 <= h[f"{prefix}accuracy"] <= 1.0
            assert 0.0 <= h[f"{prefix}balanced_accuracy"] <= 1.0
            for key in ("sensitivity", "specificity", "precision", "f1"):
                assert set(h[f"{prefix}{key}"]) == set(CLASSES)
                assert all(v is None or 0.0 <= v <= 1.0 for v in h[f"{prefix}{key}"].values())
            matrix = np.array(h[f"{prefix}confusion_matrix"])
            assert matrix.shape == (2, 2)
            assert h[f"{prefix}accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
        assert np.array(h["val_confusion_matrix"]).sum(axis=1).tolist() == [1, 1]
        assert 0.0 <= h["val_auc"] <= 1.0  # both classes validated: the AUC is defined
        sens = h["val_sensitivity"]
        assert h["val_balanced_accuracy"] == pytest.approx((sens["normal"] + sens["lesion"]) / 2)
    model = cls_trained.server.info()["models"]["classification"]
    assert model["trained"] is True and len(model["model_version"]) == 12
    # what the Slicer panel and `labelloop status` show of it: the last epoch's validation figures, no Dice
    progress = training_from_stats(cls_trained.server.info()["train_stats"]["classification"], CLASSES)
    last = stats["history"][-1]
    assert progress.metrics == {
        "val accuracy": last["val_accuracy"],
        "val balanced accuracy": last["val_balanced_accuracy"],
        "val ROC AUC": last["val_auc"],
    }
    assert progress.mean_dice is None and progress.scores() == [f"{k} {v:.3f}" for k, v in progress.metrics.items()]
    assert curve_columns(progress.history) == ["loss", "train_auc", "val_auc", "val_balanced_accuracy"]
    assert [e["val_auc"] for e in progress.history] == [h["val_auc"] for h in stats["history"]]


def test_inference_returns_a_distribution_version_and_uncertainty(cls_trained):
    r = cls_trained.server.post(f"/infer/classification?image={UNLABELED}&output=json")
    assert r.status_code == 200, r.text
    result = r.json()
    probs = result["probabilities"]
    assert list(probs) == CLASSES
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    assert result["class"] == max(probs, key=probs.get)
    assert [p["score"] for p in result["prediction"]] == list(probs.values())
    assert result["model_version"] == cls_trained.server.info()["models"]["classification"]["model_version"]
    p = np.array(list(probs.values()))
    assert set(result["uncertainty"]) == set(MEASURES)
    for name, fn in MEASURES.items():
        assert result["uncertainty"][name] == pytest.approx(float(fn(p)))
        assert 0.0 <= result["uncertainty"][name] <= 1.0
    assert "explanation" not in result


def test_scoring_stores_class_uncertainty_and_finding_and_cls_finding_ranks_by_it(cls_trained):
    """Classification scoring on the real server stores, per image without a class label, the uncertainty the task
    reports and ``finding`` = 1 - p(normal); ``cls_finding`` queues the most likely finding first, a second run
    skips what the current model scored, and the strategy hands out its first image under a lease."""
    server = cls_trained.server
    r = server.post("/scoring/classification?run_sync=true")
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    labeled = server.get("/labelloop/classes").json()["labels"]
    unlabeled = [i for i in datastore_json(server.studies)["objects"] if i not in labeled]
    assert result["scored"] == len(unlabeled) > 0 and result["skipped"] == 0
    version = server.info()["models"]["classification"]["model_version"]
    assert result["model_version"] == version
    queue = server.get("/labelloop/queue?strategy=cls_finding&k=100").json()
    items = queue["items"]
    assert sorted(item["id"] for item in items) == sorted(unlabeled)
    findings = [item["score"] for item in items]
    assert findings == sorted(findings, reverse=True) and all(item["score_name"] == "finding" for item in items)
    assert all(item["scores"]["model_version"] == version for item in items)
    top = items[0]
    probs = server.post(f"/infer/classification?image={top['id']}&output=json").json()["probabilities"]
    assert top["score"] == pytest.approx(1.0 - probs["normal"], abs=1e-6)
    for name, fn in MEASURES.items():
        assert top["scores"][name] == pytest.approx(float(fn(np.array(list(probs.values())))), abs=1e-6)
    again = server.post("/scoring/classification?run_sync=true").json()["result"]
    assert again["scored"] == 0 and again["skipped"] == len(unlabeled)
    answer = server.post("/activelearning/cls_finding", json={"client_id": "reader"}).json()
    assert answer["id"] == top["id"] and answer["score_name"] == "finding" and answer["lease"]
    assert server.delete(f"/labelloop/lease?image={top['id']}&client_id=reader").status_code == 200


def test_explanation_map_of_a_stored_image_has_its_exact_geometry(cls_trained, tmp_path):
    server = cls_trained.server
    r = server.post(
        f"/infer/classification?image={UNLABELED}&output=image", data={"params": json.dumps({"explain": True})}
    )
    assert r.status_code == 200, r.text
    out = tmp_path / "explanation.nii.gz"
    out.write_bytes(r.content)
    assert_same_geometry(out, server.studies / f"{UNLABELED}.nii.gz")
    image = sitk.ReadImage(str(out))
    assert image.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayFromImage(image)
    assert np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0 + 1e-6


def test_explanation_of_an_uploaded_oblique_image_via_the_client(cls_trained, tmp_path):
    """``output=all`` through the Slicer extension's client: the map (image part) and the result JSON."""
    image, _ = make_lesion_phantom(77, lesion=True, small=True, orientation="LAS", oblique_deg=12.0)
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(path), True)
    client = LabelLoopClient(cls_trained.server.url)
    out, result = client.infer(
        "classification", file=str(path), params={"explain": "gradcam", "explain_class": "lesion"}, out_path=tmp_path
    )
    assert out is not None
    assert_same_geometry(Path(out), path)
    assert result["explanation"] == {"method": "gradcam", "class": "lesion"}
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(
    "params,words",
    [
        ({"explain": "saliency"}, ["explain='saliency'", "gradcam", "occlusion"]),
        ({"explain": True, "explain_class": "cyst"}, ["explain_class 'cyst'", "normal, lesion"]),
    ],
)
def test_bad_explain_parameters_rejected(cls_trained, params, words):
    r = cls_trained.server.post(
        f"/infer/classification?image={UNLABELED}&output=json", data={"params": json.dumps(params)}
    )
    assert r.status_code == 400, r.text
    for w in words:
        assert w in r.json()["detail"]


def test_a_newly_published_model_is_served_without_restart(cls_trained, tmp_path):
    """Publish a changed model file (as training does: atomic replace) and the next request uses it."""
    server = cls_trained.server
    published = server.model_dir / "classification_densenet121.pt"
    old = server.info()["models"]["classification"]["model_version"]
    before = server.post(f"/infer/classification?image={UNLABELED}&output=json").json()
    checkpoint = torch.load(published, map_location="cpu")
    state = checkpoint.get("model", checkpoint)
    state["class_layers.out.bias"] = state["class_layers.out.bias"] + torch.tensor([-5.0, 5.0])  # favour lesion
    time.sleep(1.1)  # a new file modification time
    tmp = tmp_path / "model.pt"
    torch.save(checkpoint, tmp)
    os.replace(shutil.copy(tmp, published.with_suffix(".tmp")), published)
    new = server.info()["models"]["classification"]["model_version"]
    assert new and new != old
    after = server.post(f"/infer/classification?image={UNLABELED}&output=json").json()
    assert after["model_version"] == new
    assert after["probabilities"]["lesion"] > before["probabilities"]["lesion"]
    assert after["class"] == "lesion"


def test_training_fine_tunes_the_served_model_unless_asked_to_start_afresh(cls_trained, tmp_path):
    """At a learning rate of 0 the weights cannot move, so a run that starts from the served model publishes its
    weights again, and a run with ``pretrained: false`` publishes freshly initialised ones."""
    server = cls_trained.server
    published = server.model_dir / "classification_densenet121.pt"

    def weights() -> dict:
        checkpoint = torch.load(published, map_location="cpu")
        state = checkpoint.get("model", checkpoint)
        return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}  # no BN statistics

    def train(**request) -> None:
        time.sleep(1.1)  # a new modification time for the published model
        r = server.post("/train/classification", json={"max_epochs": 1, "learning_rate": 0, **request})
        assert r.status_code == 200, r.text
        task = server.wait_task("train", timeout=600)
        assert task["status"] == "DONE", f"{task}\n{server.log_tail()}"

    served = weights()
    keep = shutil.copy(published, tmp_path / "served.pt")
    stamp = published.stat().st_mtime
    train()
    assert published.stat().st_mtime > stamp, "the run published nothing"
    tuned = weights()
    assert tuned.keys() == served.keys() and all(torch.equal(tuned[k], served[k]) for k in served)
    try:
        stamp = published.stat().st_mtime
        train(pretrained="false")  # as text, the way a settings table sends it: read as false, not as true
        assert published.stat().st_mtime > stamp, "the run published nothing"
        fresh = weights()
        assert any(not torch.equal(fresh[k], served[k]) for k in served)
    finally:  # serve the trained model again for the tests after this one
        os.replace(shutil.copy(keep, published.with_suffix(".tmp")), published)


def test_segmentation_trains_on_final_labels_only_beside_class_labels(cls_server):
    datalist = cls_server.get("/datastore/?output=train").json()
    assert sorted(Path(d["image"]).name for d in datalist) == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    assert all(Path(d["label"]).parent.name == "final" for d in datalist)
    cls_server.train({"max_epochs": 1})
    stats = cls_server.info()["train_stats"]["segmentation"]
    assert stats["train_images"] + stats["val_images"] == 2
    r = cls_server.post("/infer/segmentation?image=phantom_000&output=json")
    assert r.status_code == 200, r.text
    r = cls_server.post("/infer/segmentation?image=lesion_000&output=json")  # any image, any task
    assert r.status_code == 200, r.text


def test_slicer_session_classifies_and_submits_a_class(cls_trained, tmp_path):
    """The Slicer extension's Lib uses the same class-label convention as the server and the command line."""
    from LabelLoopLib.workflow import AnnotationSession, LabelLoopError, finding_from_ras

    server = cls_trained.server
    session = AnnotationSession(LabelLoopClient(server.url), cache_dir=str(tmp_path / "cache"))
    result = session.classify(UNLABELED)
    assert result.predicted in CLASSES
    assert set(result.probabilities) == set(CLASSES)
    assert abs(sum(result.probabilities.values()) - 1.0) < 1e-4

    session.submit_class("lesion", UNLABELED)
    assert server.get("/labelloop/classes").json()["labels"][UNLABELED] == "lesion"
    stored = server.studies / "labels" / "class" / f"{UNLABELED}.json"
    assert json.loads(stored.read_text()) == {"class": "lesion"}

    # a point placed in Slicer (RAS) arrives as an LPS finding, in the file and in the label info
    image = sitk.ReadImage(str(server.studies / f"{UNLABELED}.nii.gz"))
    lps = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    session.submit_class("lesion", UNLABELED, findings=[finding_from_ras([-lps[0], -lps[1], lps[2]], 7.5)])
    expected = [{"centre_lps": [round(v, 3) for v in lps], "radius_mm": 7.5}]
    assert json.loads(stored.read_text()) == {"class": "lesion", "findings": expected}
    assert datastore_json(server.studies)["objects"][UNLABELED]["labels"]["class"]["info"]["findings"] == expected
    assert server.get("/labelloop/classes").json()["findings"][UNLABELED] == 1

    before = snapshot(server.studies)
    with pytest.raises(LabelLoopError, match="unknown class 'tumour'"):
        session.submit_class("tumour", UNLABELED)
    assert snapshot(server.studies) == before
    assert server.delete(f"/datastore/label?id={UNLABELED}&tag=class").status_code == 200


def test_explanation_map_through_the_slicer_lib_and_the_command_line(cls_trained, tmp_path):
    """The panel's *Explain* and ``labelloop classify --explain`` fetch the map on the image's own grid; a method or
    class the model does not know is refused before anything is sent."""
    from LabelLoopLib.workflow import AnnotationSession, LabelLoopError

    server = cls_trained.server
    scan = server.studies / f"{UNLABELED}.nii.gz"
    session = AnnotationSession(LabelLoopClient(server.url), cache_dir=str(tmp_path / "cache"))
    result = session.classify(UNLABELED, explain="occlusion", explain_class="lesion")
    assert result.raw["explanation"] == {"method": "occlusion", "class": "lesion"}
    assert result.explanation_path.startswith(str(tmp_path / "cache"))
    assert_same_geometry(Path(result.explanation_path), scan)
    assert result.explanation_name(UNLABELED) == f"{UNLABELED} occlusion lesion"
    assert session.classify(UNLABELED).explanation_path is None
    refused = [({"explain": "saliency"}, "unknown explanation 'saliency'"), ({"explain_class": "cyst"}, "'cyst'")]
    for kwargs, words in refused:
        with pytest.raises(LabelLoopError, match=words):
            session.classify(UNLABELED, **kwargs)

    out = tmp_path / "map.nii.gz"
    cli = run_cli(server.url, "classify", UNLABELED, "--explain", "gradcam", "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    answer = server.post(f"/infer/classification?image={UNLABELED}&output=json").json()
    assert cli.stdout.splitlines()[1] == f"gradcam map of class {answer['class']}: {out}"
    assert_same_geometry(out, scan)
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
    direct = server.post(
        f"/infer/classification?image={UNLABELED}&output=image", data={"params": json.dumps({"explain": "gradcam"})}
    )
    (tmp_path / "direct.nii.gz").write_bytes(direct.content)
    assert np.array_equal(values, sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "direct.nii.gz"))))
    for args, words in [
        (("--explain", "gradcam", "--out", str(tmp_path / "map.nrrd")), "name it .nii.gz"),
        (("--out", str(out)), "go with --explain"),
    ]:
        bad = run_cli(server.url, "classify", UNLABELED, *args)
        assert bad.returncode == 2 and words in bad.stderr, bad.stderr


def test_command_line_classifies_stores_and_lists_classes(cls_trained):
    """``labelloop classify``, ``submit-class`` (with a finding) and ``classes`` use the same convention; an unknown
    class or a malformed finding is refused with one line and nothing stored changes."""
    server = cls_trained.server
    out = run_cli(server.url, "classify", UNLABELED)
    assert out.returncode == 0, out.stderr
    answer = server.post(f"/infer/classification?image={UNLABELED}&output=json").json()
    ranked = sorted(answer["probabilities"].items(), key=lambda kv: -kv[1])
    probabilities = ", ".join(f"{name} {p:.3f}" for name, p in ranked)
    assert out.stdout.strip() == f"{UNLABELED}: {answer['class']} ({probabilities}), model {answer['model_version']}"

    before = snapshot(server.studies)
    bad = run_cli(server.url, "submit-class", UNLABELED, "tumour")
    assert bad.returncode == 1 and "unknown class 'tumour'" in bad.stderr and "normal, lesion" in bad.stderr
    bad = run_cli(server.url, "submit-class", UNLABELED, "lesion", "--finding", "1,2,3")
    assert bad.returncode == 2 and "X,Y,Z,RADIUS" in bad.stderr
    assert snapshot(server.studies) == before

    image = sitk.ReadImage(str(server.studies / f"{UNLABELED}.nii.gz"))
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in image.GetSize()])
    finding = ",".join(f"{v:.3f}" for v in centre) + ",6"
    out = run_cli(server.url, "submit-class", UNLABELED, "lesion", f"--finding={finding}")  # X may be negative
    assert out.returncode == 0 and out.stdout.strip() == f"stored class 'lesion' for {UNLABELED} with 1 finding(s)"
    stored = json.loads((server.studies / "labels" / "class" / f"{UNLABELED}.json").read_text())
    assert stored["class"] == "lesion" and stored["findings"][0]["radius_mm"] == 6.0
    assert stored["findings"][0]["centre_lps"] == pytest.approx(list(centre), abs=1e-3)

    listing = server.get("/labelloop/classes").json()
    out = run_cli(server.url, "classes")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "classes: " + ", ".join(f"{c} {listing['counts'].get(c, 0)}" for c in CLASSES)
    assert f"{UNLABELED}\tlesion\t1 finding(s)" in lines and len(lines) == 1 + len(listing["labels"])
    assert server.delete(f"/datastore/label?id={UNLABELED}&tag=class").status_code == 200


def test_batch_classification_of_a_cohort_writes_classes_and_probabilities(cls_trained, tmp_path):
    """``labelloop batch-infer --model classification --out``: nothing is stored as a label, and the CSV holds
    each image's class and probabilities, as ``/infer`` gives them."""
    server = cls_trained.server
    images = [UNLABELED, "lesion_000"]
    before = snapshot(server.studies)
    table = tmp_path / "classes.csv"
    args = ["batch-infer", "--model", "classification", "--images", *images, "--wait", "--quiet", "--out", str(table)]
    out = run_cli(server.url, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-2].startswith("DONE: 2/2 images classified")
    assert snapshot(server.studies) == before  # a classifier's answers are not labels
    rows = {row["image"]: row for row in csv.DictReader(open(table))}
    assert set(rows) == set(images)
    for image_id in images:
        answer = server.post(f"/infer/classification?image={image_id}&output=json").json()
        row = rows[image_id]
        assert row["ok"] == "True" and row["stored"] == "False" and row["class"] == answer["class"]
        assert row["model_version"] == answer["model_version"]
        for name in CLASSES:
            assert float(row[f"p_{name}"]) == pytest.approx(answer["probabilities"][name], abs=1e-4)
    usage = run_cli(server.url, "batch-infer", "--model", "classification", "--out", str(table))
    assert usage.returncode == 2 and "give --wait too" in usage.stderr


def test_detector_trains_from_findings_and_maps_the_class_on_the_input_grid(cls_sample, tmp_path):
    """``cls_network detector``: trains from the generator's findings (a lesion image without findings is left
    out and counted), reports the classification metrics, and explains with its class map on the input grid."""
    studies = shutil.copytree(cls_sample / "classification", tmp_path / "studies")
    labeled = json.loads((cls_sample / "classification_labeled.json").read_text())
    lesion_ids = sorted(i for i, c in labeled.items() if c == "lesion")
    (studies / "labels" / "class" / f"{lesion_ids[0]}.json").write_text(json.dumps({"class": "lesion"}))
    conf = {**CLS_CONF, "tasks": "classification", "cls_network": "detector"}
    server = start_server(studies, tmp_path / "models", tmp_path / "server.log", conf)
    try:
        assert "findings" in server.info()["trainers"]["classification"]["description"]
        r = server.post("/train/classification", json={"max_epochs": 2, "patch": 24, "hard_negative_every": 2})
        assert r.status_code == 200, r.text
        task = server.wait_task("train", timeout=600)
        assert task["status"] == "DONE", f"{task}\n{server.log_tail()}"
        stats = server.info()["train_stats"]["classification"]
        assert stats["network"] == "detector" and stats["skipped_without_findings"] == 1
        assert stats["train_images"] + stats["val_images"] == len(labeled) - 1
        last = stats["history"][-1]
        for key in ("val_accuracy", "val_balanced_accuracy", "val_sensitivity", "val_confusion_matrix", "val_auc"):
            assert key in last, key
        assert sum(map(sum, last["val_confusion_matrix"])) == stats["val_images"]
        state = torch.load(tmp_path / "models" / "classification_detector.pt", map_location="cpu")
        state = state.get("model", state)
        bias = state["evidence_bias"]  # fitted on the validation images, published with the weights
        assert bias.shape == (1,) and torch.isfinite(bias).all() and float(bias.abs()) > 0
        assert int(state["patch_size"]) == 24  # inference slides windows of the training patch

        client = LabelLoopClient(server.url)
        out, result = client.infer("classification", image_id=UNLABELED, params={"explain": True}, out_path=tmp_path)
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert result["class"] == max(result["probabilities"], key=result["probabilities"].get)
        assert result["explanation"] == {"method": "class_map", "class": result["class"]}
        assert_same_geometry(Path(out), studies / f"{UNLABELED}.nii.gz")
        values = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
        assert np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
    finally:
        stop_server(server)
