"""The LabelLoop app driven over HTTP through a real ``monailabel start_server`` subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import (
    FAST_CONF,
    LABELS,
    REALDATA,
    SMALL,
    assert_same_geometry,
    datastore_json,
    label_values,
    make_studies,
    snapshot,
    start_server,
    stop_server,
    write_case,
)
from labelloop_app.synthetic import make_phantom


def infer_file(server, image_path: Path, out: Path, **params) -> Path:
    """Upload an image for inference (nothing stored) and save the returned label map."""
    with open(image_path, "rb") as f:
        r = server.post(
            "/infer/segmentation?output=image",
            files={"file": (image_path.name, f)},
            data={"params": json.dumps(params)},
        )
    assert r.status_code == 200, r.text
    out.write_bytes(r.content)
    return out


def test_info_lists_task_labels_and_strategies(server):
    info = server.info()
    assert info["name"] == "LabelLoop"
    assert info["labels"] == LABELS
    seg = info["models"]["segmentation"]
    assert seg["type"] == "segmentation"
    assert seg["labels"] == LABELS
    assert seg["config"]["network"] == "unet"
    assert "segmentation" in info["trainers"]
    assert {"random", "first"} <= set(info["strategies"])
    assert info["datastore"]["total"] == 7 and info["datastore"]["completed"] == 4


def test_inference_before_any_training_is_a_clear_409(trained_server):
    r = trained_server.before_training
    assert r.status_code == 409
    assert "not been trained yet" in r.json()["detail"]


def test_training_publishes_stats_with_history(trained_server):
    stats = trained_server.info()["train_stats"]["segmentation"]
    assert stats["epoch"] == 2 and stats["total_epochs"] == 2
    history = stats["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert h["loss"] is not None and h["loss"] > 0
        assert h["seconds"] > 0
        assert set(h["val_dice"]) == set(LABELS)
        assert all(0.0 <= v <= 1.0 for v in h["val_dice"].values())
        assert 0.0 <= h["val_mean_dice"] <= 1.0
    assert stats["train_images"] + stats["val_images"] == 4
    info = trained_server.info()["models"]["segmentation"]
    assert info["trained"] is True and len(info["model_version"]) == 12


@pytest.mark.parametrize("orientation,oblique", [("RAS", 0.0), ("LPS", 0.0), ("LAS", 12.0)])
def test_label_map_has_exact_input_geometry(trained_server, tmp_path, orientation, oblique):
    image = write_case(tmp_path, f"in_{orientation}", seed=7, orientation=orientation, oblique_deg=oblique, **SMALL)
    out = infer_file(trained_server, image, tmp_path / "out.nii.gz")
    assert_same_geometry(out, image)
    assert set(label_values(out)) <= {0, *LABELS.values()}


def test_nrrd_input_gets_nrrd_output_on_the_same_grid(trained_server, tmp_path):
    image, _ = make_phantom(9, orientation="LPS", **SMALL)
    path = tmp_path / "lps.nrrd"
    sitk.WriteImage(image, str(path))
    out = infer_file(trained_server, path, tmp_path / "out.nrrd")
    assert_same_geometry(out, path)


def test_real_ct_geometry(trained_server, tmp_path):
    ct = REALDATA / "totalsegmentator" / "example_ct.nii.gz"
    out = infer_file(trained_server, ct, tmp_path / "ct_label.nii.gz")
    assert_same_geometry(out, ct)
    assert set(label_values(out)) <= {0, *LABELS.values()}


def test_real_anisotropic_mri_geometry_with_mr_modality(trained_server, tmp_path):
    """A second server configured for MR serves the same weights; the 0.78 x 0.78 x 6.5 mm brain keeps its grid."""
    models = tmp_path / "models"
    models.mkdir()
    published = trained_server.model_dir / "segmentation_unet.pt"
    (models / published.name).write_bytes(published.read_bytes())
    studies = tmp_path / "studies"
    studies.mkdir()
    mr = start_server(studies, models, tmp_path / "mr.log", {**FAST_CONF, "modality": "MR"})
    try:
        assert mr.info()["models"]["segmentation"]["config"]["modality"] == "MR"
        brain = REALDATA / "pyradiomics" / "brain1_image.nrrd"
        out = infer_file(mr, brain, tmp_path / "brain_label.nrrd")
        assert_same_geometry(out, brain)
    finally:
        stop_server(mr)


def test_final_label_is_stored(server, tmp_path):
    image_id = "case_005"
    truth_dir = tmp_path / "truth"
    write_case(tmp_path / "img", image_id, seed=105, label_dir=truth_dir, orientation="LPS", **SMALL)
    label = truth_dir / f"{image_id}.nii.gz"
    with open(label, "rb") as f:
        r = server.put(
            f"/datastore/label?image={image_id}&tag=final",
            files={"label": (label.name, f)},
            data={"params": json.dumps({"label_info": [{"name": "liver", "idx": 1}]})},
        )
    assert r.status_code == 200, r.text
    stored = server.studies / "labels" / "final" / f"{image_id}.nii.gz"
    assert stored.read_bytes() == label.read_bytes()
    assert "final" in datastore_json(server.studies)["objects"][image_id]["labels"]
    r = server.get(f"/datastore/label?label={image_id}&tag=final")
    assert r.status_code == 200 and r.content == label.read_bytes()
    # leave the session's datastore as the other tests expect it
    assert server.delete(f"/datastore/label?id={image_id}&tag=final").status_code == 200


def test_next_inference_uses_new_model_without_restart(trained_server):
    before = trained_server.post("/infer/segmentation?image=case_004&output=json")
    assert before.status_code == 200, before.text
    old = before.json()["model_version"]
    assert old == trained_server.info()["models"]["segmentation"]["model_version"]
    time.sleep(1.1)  # a new file modification time
    trained_server.train({"max_epochs": 1})
    new = trained_server.info()["models"]["segmentation"]["model_version"]
    assert new != old
    after = trained_server.post("/infer/segmentation?image=case_004&output=json")
    assert after.status_code == 200 and after.json()["model_version"] == new
    assert trained_server.process.poll() is None


LOAD_WINDOW = 2.5
"""Seconds for the server's measure of other processes' CPU use (over its last second) to follow a change."""


def infer_threads(server) -> int:
    """The CPU threads an inference of the session server reports it used."""
    r = server.post("/infer/segmentation?image=case_004&output=json")
    assert r.status_code == 200, r.text
    return r.json()["cpu_threads"]


def test_an_inference_beside_a_training_takes_a_share_of_the_cpu_threads(trained_server):
    """PyTorch's threads spin while they wait for each other: beside a training process, an inference with all of
    them ran 5 to 28 times slower than alone on two cores, with half of them 1.7 times (``benchmarks/cpu_sharing.py``).
    """
    s = trained_server.server
    time.sleep(LOAD_WINDOW)
    threads = infer_threads(s)
    assert threads >= 1
    r = s.post("/train/segmentation", json={"max_epochs": 1000, "max_minutes": 3})
    assert r.status_code == 200, r.text
    try:
        deadline = time.time() + 60
        while s.get("/train/").json().get("status") != "RUNNING" and time.time() < deadline:
            time.sleep(0.2)
        assert s.get("/train/").json().get("status") == "RUNNING", s.log_tail()
        assert infer_threads(s) == max(1, threads // 2)
    finally:
        assert s.delete("/train/").status_code == 200
        s.wait_task("train", timeout=120)
    time.sleep(LOAD_WINDOW)
    assert infer_threads(s) == threads


def test_an_inference_leaves_the_cores_that_other_processes_keep_busy(trained_server):
    """Work the server did not start (another server, a benchmark) is measured, not told."""
    s = trained_server.server
    time.sleep(LOAD_WINDOW)
    threads = infer_threads(s)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(threads)]
    try:
        time.sleep(LOAD_WINDOW)
        assert infer_threads(s) == 1
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    time.sleep(LOAD_WINDOW)
    assert infer_threads(s) == threads


def test_batch_infer_stores_original_labels(trained_server):
    r = trained_server.post("/batch/infer/segmentation?images=unlabeled", json={"device": "cpu"})
    assert r.status_code == 200, r.text
    task = trained_server.wait_task("batch_infer", timeout=300)
    assert task["status"] == "DONE", task
    ds = datastore_json(trained_server.studies)["objects"]
    unlabeled = [k for k, v in ds.items() if "final" not in v["labels"]]
    assert unlabeled
    for image_id in unlabeled:
        assert "original" in ds[image_id]["labels"], image_id
        out = trained_server.studies / "labels" / "original" / f"{image_id}.nii.gz"
        assert_same_geometry(out, trained_server.studies / f"{image_id}.nii.gz")


# --- bad input: a clear 4xx naming the problem, and the datastore exactly as before -------------------------


def _bad_labels(tmp_path: Path, image: Path) -> dict:
    ref = sitk.ReadImage(str(image))
    zeros = np.zeros(sitk.GetArrayViewFromImage(ref).shape, dtype=np.uint8)
    out = {}

    def save(name, arr, like=ref, **geom):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(like) if arr.shape == zeros.shape else img.SetSpacing(ref.GetSpacing())
        for k, v in geom.items():
            getattr(img, f"Set{k}")(v)
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        out[name] = path

    unknown = zeros.copy()
    unknown[2:4, 2:4, 2:4] = 9
    save("unknown_value", unknown)
    save("wrong_size", zeros[:, :, :-3])
    save("wrong_origin", zeros, Origin=(1.0, 2.0, 3.0))
    save("wrong_spacing", zeros, Spacing=(1.0, 1.0, 1.0))
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image")
    out["garbage"] = garbage
    return out


@pytest.mark.parametrize(
    "case,status,words",
    [
        ("unknown_value", 422, ["values [9]", "liver=1"]),
        ("wrong_size", 422, ["geometry", "size"]),
        ("wrong_origin", 422, ["geometry", "origin"]),
        ("wrong_spacing", 422, ["geometry", "spacing"]),
        ("garbage", 422, ["cannot read"]),
    ],
)
def test_bad_label_rejected_and_datastore_unchanged(server, tmp_path, case, status, words):
    image_id = "case_000"
    bad = _bad_labels(tmp_path, server.studies / f"{image_id}.nii.gz")[case]
    before = snapshot(server.studies)
    with open(bad, "rb") as f:
        r = server.put(f"/datastore/label?image={image_id}&tag=final", files={"label": (bad.name, f)})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for w in words:
        assert w in detail, detail
    assert snapshot(server.studies) == before
    assert server.get("/info/").status_code == 200


def test_unreadable_image_upload_rejected(server, tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08 truncated gzip")
    before = snapshot(server.studies)
    with open(bad, "rb") as f:
        r = server.put("/datastore/?image=broken", files={"file": (bad.name, f)})
    assert r.status_code == 422 and "cannot read image 'broken'" in r.json()["detail"]
    assert snapshot(server.studies) == before


def test_unsupported_upload_type_rejected(server, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    before = snapshot(server.studies)
    with open(bad, "rb") as f:
        r = server.put("/datastore/?image=notes", files={"file": (bad.name, f)})
    assert r.status_code == 422 and "unsupported file type" in r.json()["detail"]
    assert snapshot(server.studies) == before


@pytest.mark.parametrize(
    "path,status,words",
    [
        ("/infer/nope?image=case_000", 404, ["unknown model 'nope'", "segmentation"]),
        ("/train/nope", 404, ["unknown train task 'nope'"]),
        ("/batch/infer/nope", 404, ["unknown model 'nope'"]),
        ("/activelearning/nope", 404, ["unknown strategy 'nope'", "random"]),
        ("/infer/segmentation?image=no_such_image", 404, ["no_such_image' is not in the datastore"]),
        ("/infer/segmentation?image=../../etc/passwd", 400, ["invalid image"]),
    ],
)
def test_unknown_names_rejected(server, path, status, words):
    before = snapshot(server.studies)
    r = server.post(path)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"]
    assert snapshot(server.studies) == before


@pytest.mark.parametrize(
    "method,path,status,words",
    [
        ("get", "/datastore/image/info?image=no_such_image", 404, ["image 'no_such_image' is not in the datastore"]),
        ("get", "/datastore/image/info?image=../../etc/passwd", 400, ["invalid image id '../../etc/passwd'"]),
        ("get", "/datastore/label/info?label=no_such_image&tag=final", 404, ["no_such_image' is not in the datastore"]),
        ("get", "/datastore/label/info?label=case_000&tag=nope", 404, ["no 'nope' label for image 'case_000'"]),
        ("get", "/datastore/label/info?label=case_000&tag=../final", 400, ["invalid label tag '../final'"]),
        ("get", "/datastore/image?image=no_such_image", 404, ["image 'no_such_image' is not in the datastore"]),
        ("get", "/datastore/image?image=../studies/case_000", 400, ["invalid image id '../studies/case_000'"]),
        ("get", "/datastore/label?label=case_000&tag=nope", 404, ["no 'nope' label for image 'case_000'"]),
        ("put", "/datastore/image/info?image=no_such_image", 404, ["image 'no_such_image' is not in the datastore"]),
        ("put", "/datastore/label/info?label=case_000&tag=nope", 404, ["no 'nope' label for image 'case_000'"]),
        ("put", "/datastore/label/info?label=no_such_image&tag=final", 404, ["no_such_image' is not in the datastore"]),
    ],
)
def test_what_is_not_stored_is_a_404_and_changes_nothing(server, method, path, status, words):
    """MONAI Label answers these reads with 200 ``{}`` and these updates with a 500."""
    before = snapshot(server.studies)
    kw = {"data": {"info": json.dumps({"note": "x"})}} if method == "put" else {}
    r = getattr(server, method)(path, **kw)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"]
    assert snapshot(server.studies) == before


def test_stored_images_labels_and_their_info_still_read_and_update(server):
    assert server.get("/datastore/image?image=case_001").content == (server.studies / "case_001.nii.gz").read_bytes()
    label = server.get("/datastore/label?label=case_001&tag=final").content
    assert label == (server.studies / "labels" / "final" / "case_001.nii.gz").read_bytes()
    image = server.get("/datastore/image/info?image=case_001")
    assert image.status_code == 200 and image.json()["name"].startswith("case_001"), image.text
    r = server.put("/datastore/label/info?label=case_001&tag=final", data={"info": json.dumps({"reviewer": "ann"})})
    assert r.status_code == 200, r.text
    label = server.get("/datastore/label/info?label=case_001&tag=final")
    assert label.status_code == 200 and label.json()["reviewer"] == "ann", label.text


@pytest.mark.parametrize(
    "params,words",
    [
        ({"max_epochs": "abc"}, ["max_epochs takes a whole number of epochs, at least 1, not 'abc'"]),
        ({"max_epochs": 0, "max_minutes": -5}, ["max_epochs takes", "not 0", "max_minutes takes", "not -5"]),
        ({"max_epochs": 2.5}, ["max_epochs takes a whole number"]),
        ({"learning_rate": "fast"}, ["learning_rate takes a number, 0 or more, not 'fast'"]),
        ({"val_split": 1}, ["val_split takes a share"]),
        ({"pretrained": "maybe"}, ["pretrained takes true or false, not 'maybe'"]),
        ({"dataset": "MyDataset"}, ["dataset takes one of", "CacheDataset", "not 'MyDataset'"]),
        ({"max_epoch": 3}, ["unknown parameter 'max_epoch': did you mean 'max_epochs'?"]),
    ],
)
def test_training_parameters_a_run_cannot_take_are_refused_before_it_starts(server, params, words):
    before, last_run = snapshot(server.studies), server.get("/train/").text
    r = server.post("/train/segmentation", json=params)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("cannot train 'segmentation': ")
    for w in words:
        assert w in r.json()["detail"]
    assert server.get("/train/").text == last_run, "a training started"
    assert snapshot(server.studies) == before


@pytest.mark.parametrize(
    "params,words",
    [
        ({"sw_overlap": "x"}, ["sw_overlap takes a share of the window, from 0 up to (not including) 1, not 'x'"]),
        ({"sw_overlap": 1.5, "sw_batch_size": 0}, ["sw_overlap takes", "not 1.5", "sw_batch_size takes", "not 0"]),
        ({"roi_size": "abc"}, ["roi_size takes a window size", "not 'abc'"]),
        ({"roi_size": [0, 0, 0]}, ["roi_size takes a window size", "not [0, 0, 0]"]),
        ({"restore": "bogus"}, ["restore takes linear or nearest, not 'bogus'"]),
    ],
)
def test_inference_parameters_a_model_cannot_take_are_refused(trained_server, params, words):
    """Before, each of these made ``/infer`` answer 500 (or, for ``restore``, quietly used another mode), and a batch
    started and failed on every image."""
    s = trained_server.server
    before = snapshot(s.studies)
    single = s.post("/infer/segmentation?image=case_005&output=json", data={"params": json.dumps(params)})
    batch = s.post("/batch/infer/segmentation?images=case_005", json=params)
    for r, what in ((single, "infer with"), (batch, "run batch inference with")):
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"cannot {what} 'segmentation': ")
        for w in words:
            assert w in r.json()["detail"]
    assert snapshot(s.studies) == before


def test_inference_parameters_given_as_text_are_read_as_numbers(trained_server):
    params = {"roi_size": "48,48,32", "sw_batch_size": "2", "sw_overlap": "0.25"}
    r = trained_server.post("/infer/segmentation?image=case_005&output=json", data={"params": json.dumps(params)})
    assert r.status_code == 200, r.text
    assert r.json()["label_names"] == {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}


@pytest.mark.parametrize(
    "params,words",
    [
        ({"max_images": -1}, ["max_images takes a whole number of images, at least 1, not -1"]),
        ({"max_images": "x", "force": "perhaps"}, ["max_images takes", "not 'x'", "force takes true or false"]),
    ],
)
def test_scoring_parameters_a_run_cannot_take_are_refused(server, params, words):
    """Before, ``max_images: -1`` scored every image but the last, and ``"x"`` failed in the background."""
    before = snapshot(server.studies)
    r = server.post("/scoring/segmentation", json=params)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("cannot score with 'segmentation': ")
    for w in words:
        assert w in r.json()["detail"]
    assert snapshot(server.studies) == before


def test_a_client_id_that_is_not_a_name_is_refused(server):
    """Before, a list was leased to as its text ``"['x']"``."""
    asked = server.post("/activelearning/random", json={"client_id": ["x"]})
    taken = server.post("/labelloop/lease", params={"image": "case_005", "client_id": "a\nb"})
    for r, what in ((asked, "ask 'random'"), (taken, "lease 'case_005'")):
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"cannot {what}: client_id takes a name of up to 200 printable characters")
    holders = [e["lease"]["client_id"] for e in server.get("/labelloop/queue?strategy=random").json()["leased"]]
    assert not any(h in ("['x']", "a\nb", "a b") for h in holders), holders


@pytest.mark.parametrize(
    "method,path,field,text,upload",
    [
        ("put", "/datastore/label?image=case_000&tag=final", "params", "{bad", "label"),
        ("put", "/datastore/label?image=case_000&tag=final", "params", "[1, 2]", "label"),
        ("put", "/datastore/image?image=fresh_case", "params", "5", "file"),
        ("put", "/datastore/image/info?image=case_000", "info", "{bad", None),
        ("put", "/datastore/label/info?label=case_000&tag=final", "info", '"text"', None),
        ("post", "/infer/segmentation?image=case_000&output=json", "params", "{bad", None),
    ],
)
def test_a_json_form_field_that_is_not_a_json_object_is_refused(server, method, path, field, text, upload):
    """Before, each of these was a 500 from inside MONAI Label's endpoint."""
    label = server.studies / "labels" / "final" / "case_000.nii.gz"
    before = snapshot(server.studies)
    files = {upload: (label.name, label.read_bytes())} if upload else None
    r = getattr(server, method)(path, data={field: text}, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"form field {field!r} ")
    assert ("is not valid JSON" if text.startswith("{") else f"must be a JSON object, not {text!r}") in r.json()[
        "detail"
    ]
    assert snapshot(server.studies) == before


def test_training_with_nothing_to_train_on_is_refused_before_it_starts(tmp_path):
    """Before, MONAI Label answered 200 and the run failed in the background."""
    studies = make_studies(tmp_path, n_labeled=0, n_unlabeled=2)
    conf = {**FAST_CONF, "auto_scoring": "false", "tasks": "segmentation,classification"}
    s = start_server(studies, tmp_path / "models", tmp_path / "server.log", conf)
    try:
        before = snapshot(studies)
        for model, words in (
            ("segmentation", "no image has a final label yet; submit labels first"),
            ("classification", "no class labels to train on: submit labels with tag 'class' first"),
        ):
            r = s.post(f"/train/{model}", json={"max_epochs": 1})
            assert r.status_code == 409, r.text
            assert r.json()["detail"] == f"cannot train {model!r}: {words}"
        assert s.get("/train/").status_code == 404, "a training started"
        assert snapshot(studies) == before
    finally:
        stop_server(s)


@pytest.mark.parametrize("image_id,tag", [("../escape", "final"), ("case_000", "../../escape"), ("a/b", "final")])
def test_path_tricks_in_ids_rejected(server, tmp_path, image_id, tag):
    img = write_case(tmp_path, "x", seed=3, **SMALL)
    before = snapshot(server.studies)
    with open(img, "rb") as f:
        r1 = server.put(f"/datastore/?image={image_id}", files={"file": (img.name, f)})
    with open(img, "rb") as f:
        r2 = server.put(f"/datastore/label?image={image_id}&tag={tag}", files={"label": (img.name, f)})
    assert 400 <= r1.status_code < 500 and 400 <= r2.status_code < 500, (r1.text, r2.text)
    assert snapshot(server.studies) == before
    assert not (server.studies.parent / "escape.nii.gz").exists()


def test_existing_image_not_overwritten(server, tmp_path):
    img = write_case(tmp_path, "case_000", seed=999, **SMALL)
    before = snapshot(server.studies)
    with open(img, "rb") as f:
        r = server.put("/datastore/?image=case_000", files={"file": (img.name, f)})
    assert r.status_code == 409 and "already exists" in r.json()["detail"]
    assert snapshot(server.studies) == before
