"""Server-side batch inference through real servers: image selection, progress, ``original`` results with
``final`` untouched, a broken image among good ones, one batch at a time, cancellation, and interactive requests
served while a batch runs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from conftest import FAST_CONF, SMALL, assert_same_geometry, datastore_json, run_cli, snapshot, write_case
from labelloop_app.datastore import SegmentationLabelCheck
from labelloop_app.devserver import Server, start_server, stop_server
from labelloop_app.errors import UnprocessableInput

RUNNING = ("SUBMITTED", "RUNNING")


def hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


def progress(server: Server) -> dict:
    r = server.get("/labelloop/batch")
    assert r.status_code == 200, r.text
    return r.json()


def wait_batch(server: Server, timeout: float = 240) -> List[dict]:
    """Poll the progress endpoint until the batch ends; every answer seen, the last one final."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        seen.append(progress(server))
        if seen[-1]["status"] not in RUNNING:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"batch did not finish in {timeout}s: {seen[-1]}\n{server.log_tail()}")


def wait_until(predicate, server: Server, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = progress(server)
        if predicate(p):
            return p
        time.sleep(0.1)
    raise AssertionError(f"condition not reached in {timeout}s: {p}")


def cli(server: Server, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cli(server.url, *args, timeout=timeout)


# --- the session server (trained) --------------------------------------------------------------------------


def test_batch_over_an_id_list_stores_original_and_leaves_final_untouched(trained_server):
    ids = ["case_000", "case_005"]  # one with a final label, one without
    for image_id in ids:  # results of earlier tests would hide a batch that stores nothing
        trained_server.delete(f"/datastore/label?id={image_id}&tag=original")
    final_dir = trained_server.studies / "labels" / "final"
    final_before = hashes(final_dir)
    final_info_before = {
        k: v["labels"].get("final") for k, v in datastore_json(trained_server.studies)["objects"].items()
    }

    r = trained_server.post("/batch/infer/segmentation", json={"images": ids, "device": "cpu"})
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["status"] in RUNNING and started["total"] == 2 and started["images"] == "list"
    seen = wait_batch(trained_server)
    last = seen[-1]
    assert last["id"] == started["id"] and last["status"] == "DONE", last
    dones = [p["done"] for p in seen]
    assert dones == sorted(dones) and last["done"] == last["total"] == last["succeeded"] == 2
    assert last["failed"] == [] and last["device"] == "cpu" and last["label_tag"] == "original"
    assert {r["image"] for r in last["results"]} == set(ids)
    assert trained_server.get("/batch/infer").json()["id"] == started["id"]  # MONAI Label's endpoint agrees

    ds = datastore_json(trained_server.studies)["objects"]
    for image_id in ids:
        assert "original" in ds[image_id]["labels"], image_id
        out = trained_server.studies / "labels" / "original" / f"{image_id}.nii.gz"
        assert_same_geometry(out, trained_server.studies / f"{image_id}.nii.gz")
    assert hashes(final_dir) == final_before
    assert {k: v["labels"].get("final") for k, v in ds.items()} == final_info_before


def test_serial_pipelined_and_parallel_batches_store_the_same_label_maps_up_to_rounding(trained_server):
    ids = ["case_001", "case_002", "case_003"]
    modes = {
        "serial": {"prefetch": 0, "workers": 1},
        "pipelined": {"prefetch": 1, "workers": 1},
        "parallel": {"workers": 3},
    }
    stored, versions = {}, {}
    for mode, params in modes.items():
        for image_id in ids:
            trained_server.delete(f"/datastore/label?id={image_id}&tag=original")
        r = trained_server.post("/batch/infer/segmentation", json={"images": ids, "device": "cpu", **params})
        assert r.status_code == 200, r.text
        last = wait_batch(trained_server)[-1]
        assert last["status"] == "DONE" and last["succeeded"] == 3 and last["failed"] == [], (mode, last)
        assert all(stage is None for stage in last["stages"].values()), last["stages"]
        if mode == "parallel":
            assert any("3 workers" in line for line in last["details"]), last["details"]
        versions[mode] = {r["model_version"] for r in last["results"]}
        folder = trained_server.studies / "labels" / "original"
        stored[mode] = {i: sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{i}.nii.gz"))) for i in ids}
        for image_id in ids:
            assert_same_geometry(folder / f"{image_id}.nii.gz", trained_server.studies / f"{image_id}.nii.gz")
    assert len(versions["serial"]) == 1, versions
    assert versions["pipelined"] == versions["parallel"] == versions["serial"], versions
    for image_id in ids:
        assert np.array_equal(stored["pipelined"][image_id], stored["serial"][image_id]), image_id
        # Parallel workers run PyTorch with fewer threads each, and the kernels PyTorch picks for a thread count and
        # CPU may sum in another order: a voxel whose two best classes are within rounding may flip, nothing more.
        differing = np.count_nonzero(stored["parallel"][image_id] != stored["serial"][image_id])
        assert differing <= 1e-3 * stored["serial"][image_id].size, (image_id, differing)


@pytest.mark.parametrize(
    "query,body,status,words",
    [
        ("?images=case_000,nope_1,nope_2", None, 404, ["unknown image id(s): 'nope_1', 'nope_2'"]),
        ("", {"images": ["case_001", "../etc"]}, 404, ["'../etc'"]),
        ("", {"images": []}, 422, ["empty"]),
        ("", {"label_tag": "final"}, 422, ["'original'", "label_tag 'final' is not allowed"]),
        ("", {"device": "tpu"}, 422, ["device 'tpu'"]),
        ("", {"prefetch": -1}, 422, ["prefetch"]),
        ("", {"workers": "many"}, 422, ["workers"]),
    ],
)
def test_bad_requests_are_refused_before_anything_starts(trained_server, query, body, status, words):
    before = trained_server.get("/batch/infer?all=true")
    before_ids = [j["id"] for j in before.json()] if before.status_code == 200 else []
    files = snapshot(trained_server.studies)
    r = trained_server.post(f"/batch/infer/segmentation{query}", json=body)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"], r.json()["detail"]
    after = trained_server.get("/batch/infer?all=true")
    assert ([j["id"] for j in after.json()] if after.status_code == 200 else []) == before_ids
    assert snapshot(trained_server.studies) == files


# --- a server of its own: a copy datastore with a broken image --------------------------------------------


@dataclass
class OwnServer:
    server: Server
    before_model: requests.Response
    good: List[str]


@pytest.fixture(scope="module")
def own(trained_server, tmp_path_factory) -> Iterator[OwnServer]:
    """Four small phantoms and a corrupt ``broken.nii.gz``; the session's trained model copied in after a first
    request has shown the 409 of an untrained model."""
    root = tmp_path_factory.mktemp("batch_own")
    studies = root / "studies"
    good = [f"img_{i}" for i in range(4)]
    for i, name in enumerate(good):
        write_case(studies, name, seed=300 + i, orientation=["RAS", "LPS"][i % 2], **SMALL)
    (studies / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a NIfTI file")
    models = root / "models"
    models.mkdir()
    server = start_server(studies, models, root / "server.log", FAST_CONF)
    try:
        before_model = server.post("/batch/infer/segmentation?images=all", json={})
        shutil.copy(trained_server.model_dir / "segmentation_unet.pt", models / "segmentation_unet.pt")
        yield OwnServer(server, before_model, good)
    finally:
        stop_server(server)


def test_no_model_yet_is_a_409(own):
    r = own.before_model
    assert r.status_code == 409 and "not been trained yet" in r.json()["detail"]
    assert own.server.get("/labelloop/batch").status_code == 404  # nothing was started


def test_broken_image_fails_alone_and_the_cli_reports_it(own):
    """The CLI waits with a progress bar; exit code 4 = finished with failures."""
    s = own.server
    res = cli(s, "batch-infer", "--images", "all", "--device", "cuda", "--wait", "--poll", "0.3")
    assert res.returncode == 4, res.stdout + res.stderr
    assert "DONE: 4/5 images stored as 'original'" in res.stdout
    assert "failed broken: cannot read image 'broken'" in res.stdout
    assert "Traceback" not in res.stderr
    last = progress(s)
    assert last["status"] == "DONE" and last["done"] == 5 and last["succeeded"] == 4
    assert [f["image"] for f in last["failed"]] == ["broken"]
    assert "cannot read image 'broken'" in last["failed"][0]["error"]
    if last["device"] == "cpu":  # no GPU here: the requested CUDA device fell back to the CPU, with a note
        assert any("CUDA is not available" in d for d in last["details"])
    else:
        assert last["device"] == "cuda:0"
    ds = datastore_json(s.studies)["objects"]
    for image_id in own.good:
        assert "original" in ds[image_id]["labels"]
        assert_same_geometry(s.studies / "labels" / "original" / f"{image_id}.nii.gz", s.studies / f"{image_id}.nii.gz")
    assert "original" not in ds["broken"]["labels"]
    assert not (s.studies / "labels" / "final").exists() or not any((s.studies / "labels" / "final").iterdir())


def test_one_batch_at_a_time_interactive_requests_first_and_cancel(own):
    """A slow batch (sliding-window overlap 0.9): a second batch is a 409, an annotator's /infer is answered
    while the batch pauses for it, and DELETE stops the batch within an image."""
    s = own.server
    r = s.post("/batch/infer/segmentation?images=img_0,img_1,img_2,img_3", json={"sw_overlap": 0.9})
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    try:
        second = s.post("/batch/infer/segmentation?images=all", json={})
        assert second.status_code == 409 and "already running" in second.json()["detail"]
        running = wait_until(lambda p: p["current"] is not None, s)
        assert running["status"] == "RUNNING" and running["done"] < running["total"]

        t0 = time.time()
        interactive = s.post("/infer/segmentation?image=img_1&output=json")
        interactive_s = time.time() - t0
        assert interactive.status_code == 200, interactive.text
        assert progress(s)["stage_seconds"]["paused"] > 0  # the batch yielded to the annotator
        assert interactive_s < 60
    finally:
        t0 = time.time()
        stopped = s.delete("/labelloop/batch")
        stop_s = time.time() - t0
    assert stopped.status_code == 200, stopped.text
    job = stopped.json()
    assert job["id"] == job_id and job["status"] == "STOPPED" and job["cancel_requested"]
    assert job["done"] < job["total"] and job["stages"] == {"reading": None, "inferring": None, "writing": None}
    assert stop_s < 15, stop_s
    files = snapshot(s.studies)
    time.sleep(1.0)
    assert snapshot(s.studies) == files  # nothing is written after the stop
    assert s.delete("/labelloop/batch").status_code == 404
    assert s.delete("/batch/infer").json() is None  # MONAI Label's answer when nothing runs
    assert s.get("/batch/infer?check_if_running=true").status_code == 404


# --- the label check the batch stores with ------------------------------------------------------------------------
def test_label_check_with_values_in_memory_still_reads_the_grid_from_the_file(tmp_path):
    image = sitk.Image([6, 5, 4], sitk.sitkInt16)
    image.SetSpacing((1.5, 1.5, 3.0))
    image_path, label_path = str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz")
    sitk.WriteImage(image, image_path)
    label = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    label.CopyInformation(image)
    label[1, 1, 1] = 2
    sitk.WriteImage(label, label_path)
    check = SegmentationLabelCheck({"liver": 1, "spleen": 2})
    values = sitk.GetArrayViewFromImage(label)
    check("case", image_path, label_path, {}, values)  # as written: accepted
    check("case", image_path, label_path, {})  # the same from the file

    wrong = values.copy()
    wrong[0, 0, 0] = 7
    with pytest.raises(UnprocessableInput, match=r"values \[7\] that name no configured structure"):
        check("case", image_path, label_path, {}, wrong)
    label.SetSpacing((1.5, 1.5, 2.0))
    sitk.WriteImage(label, label_path)
    with pytest.raises(UnprocessableInput, match="label geometry does not match image 'case'.*spacing"):
        check("case", image_path, label_path, {}, values)
