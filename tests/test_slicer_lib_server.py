"""The Slicer extension's Slicer-free layer (LabelLoopLib) driven against a real LabelLoop server.

This is the path the Slicer panel takes: connect, fetch a sample, auto-segment into a ``.seg.nrrd``, submit by
segment name, train with progress polling, batch inference, and the errors a person sees when things go wrong.
Images created here get their own ids (``slicer_*``) so that the session's other tests keep their datastore.
"""

from __future__ import annotations

import json
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from labelloop_app.synthetic import make_phantom
from LabelLoopLib import colors, segio
from LabelLoopLib.client import LabelLoopClient, LabelLoopError, ServerError, ServerUnreachable
from LabelLoopLib.workflow import AnnotationSession, UnknownSegmentsError, describe_error

pytestmark = pytest.mark.server

LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}  # the app's default structures
SMALL = {"size": (64, 64, 32), "spacing": (5.0, 5.0, 8.0)}  # quick on a CPU


def datastore_json(studies: Path) -> dict:
    return json.loads((studies / "datastore_v2.json").read_text())


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def session(trained_server, tmp_path_factory) -> AnnotationSession:
    s = AnnotationSession(LabelLoopClient(trained_server.url), cache_dir=str(tmp_path_factory.mktemp("slicer-cache")))
    s.connect()
    return s


def add_phantom(session: AnnotationSession, folder: Path, image_id: str, seed: int, orientation: str = "LPS"):
    """Upload a synthetic image through the client; returns (image path on this side, true label array x,y,z)."""
    image, label = make_phantom(seed, orientation=orientation, **SMALL)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{image_id}.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    assert session.upload_image(str(path), image_id) == image_id
    truth = np.transpose(sitk.GetArrayFromImage(label), (2, 1, 0))
    return path, truth


def final_label(session: AnnotationSession, image_id: str, folder: Path) -> np.ndarray:
    path = session.client.download_label(image_id, "final", folder / f"{image_id}_final.nii.gz")
    return segio.read_labelmap(path)[0]


def test_connect_reads_structures_models_strategies_progress_and_metrics(session, trained_server):
    info = session.connect()
    assert info.name == "LabelLoop"
    assert session.label_map == LABELS
    seg = info.segmentation_model
    assert seg is not None and seg.name == "segmentation" and seg.trained is True and seg.model_version
    assert info.classification_model is None
    assert {"random", "first"} <= set(info.strategies) and "segmentation" in info.trainers
    assert info.datastore.total >= 7 and 0 < info.datastore.completed <= info.datastore.total
    assert info.train_stats["segmentation"]["history"]
    assert "best Dice" in info.metrics_summary()
    with pytest.raises(LabelLoopError, match="no classification model"):
        session.classify("case_000")


def test_next_sample_downloads_the_image_bytes_unchanged(session, trained_server):
    sample = session.next_sample("first")
    assert sample is not None and session.current is sample
    stored = trained_server.studies / f"{sample.image_id}.nii.gz"
    assert Path(sample.path).name == stored.name
    assert Path(sample.path).read_bytes() == stored.read_bytes()
    ds = datastore_json(trained_server.studies)["objects"][sample.image_id]
    assert "final" not in ds["labels"]  # active learning offers unlabeled images


def test_empty_segmentation_names_every_structure_on_the_image_grid(session, tmp_path):
    path, _ = add_phantom(session, tmp_path, "slicer_empty", seed=301, orientation="LAS")
    session.fetch_image("slicer_empty")
    seg_path = session.empty_segmentation()
    data = segio.read_seg_nrrd(seg_path)
    shape, geometry = segio.read_image_geometry(path)
    assert data.shape == shape
    assert np.allclose(data.geometry.origin, geometry.origin) and data.geometry.same_axes(geometry)
    assert {s.name: s.label_value for s in data.segments} == LABELS
    assert not data.layers.any()


def test_auto_segment_seg_nrrd_round_trips_through_submit(session, trained_server, tmp_path):
    path, _ = add_phantom(session, tmp_path, "slicer_auto", seed=302)
    session.fetch_image("slicer_auto")
    auto = session.auto_segment()
    model_label, _ = segio.read_labelmap(auto.label_path)
    assert auto.unknown_values == []

    data = segio.read_seg_nrrd(auto.seg_path)
    assert [s.name for s in data.segments] == list(LABELS)
    for seg in data.segments:
        assert seg.label_value == LABELS[seg.name]
        assert seg.color == pytest.approx(colors.color_for(seg.name), abs=1e-9)
        assert np.array_equal(data.mask(seg), model_label == LABELS[seg.name]), seg.name
    shape, geometry = segio.read_image_geometry(path)
    assert data.shape == shape and np.allclose(data.geometry.origin, geometry.origin)

    result = session.submit(auto.seg_path, allow_empty=True)
    assert result.image_id == "slicer_auto" and result.dropped_names == []
    stored = final_label(session, "slicer_auto", tmp_path)
    assert np.array_equal(stored, model_label)
    entry = datastore_json(trained_server.studies)["objects"]["slicer_auto"]["labels"]["final"]
    assert [i["name"] for i in entry["info"]["label_info"]] == list(LABELS)
    assert [i["idx"] for i in entry["info"]["label_info"]] == list(LABELS.values())


def test_shuffled_segments_are_stored_by_name_not_by_order(session, tmp_path):
    path, truth = add_phantom(session, tmp_path, "slicer_shuffled", seed=303, orientation="RAS")
    shape, geometry = segio.read_image_geometry(path)
    names = list(LABELS)
    random.Random(5).shuffle(names)
    assert names != list(LABELS)
    slicer_values = np.zeros(shape, dtype=np.uint8)  # Slicer numbers its segments 1, 2, ... in its own order
    segments = []
    for i, name in enumerate(names):
        slicer_values[truth == LABELS[name]] = i + 1
        segments.append((name, i + 1, colors.color_for(name)))
    assert not np.array_equal(slicer_values, truth)
    seg_path = segio.write_seg_nrrd(tmp_path / "edited.seg.nrrd", slicer_values, geometry, segments)

    result = session.submit(seg_path, image_id="slicer_shuffled")
    assert result.voxels_per_name == {n: int(np.count_nonzero(truth == v)) for n, v in LABELS.items()}
    assert np.array_equal(final_label(session, "slicer_shuffled", tmp_path), truth)


def test_a_label_map_file_can_be_submitted_directly(session, tmp_path):
    path, truth = add_phantom(session, tmp_path, "slicer_labelmap", seed=306, orientation="LAS")
    _, geometry = segio.read_image_geometry(path)
    label = segio.write_labelmap(tmp_path / "truth.nii.gz", truth, geometry, reference_image=path)
    result = session.submit(str(label), image_id="slicer_labelmap")
    assert result.dropped_names == []
    assert np.array_equal(final_label(session, "slicer_labelmap", tmp_path), truth)


def test_unknown_segment_names_are_refused_then_dropped_on_request(session, tmp_path):
    path, truth = add_phantom(session, tmp_path, "slicer_unknown", seed=304)
    shape, geometry = segio.read_image_geometry(path)
    layer = np.where(truth == LABELS["liver"], 1, 0).astype(np.uint8)
    layer[2:6, 2:6, 2:6] = 2
    seg_path = segio.write_seg_nrrd(
        tmp_path / "u.seg.nrrd", layer, geometry, [("liver", 1, (1, 0, 0)), ("tumour", 2, (0, 1, 0))]
    )
    with pytest.raises(UnknownSegmentsError) as err:
        session.submit(seg_path, image_id="slicer_unknown")
    assert err.value.names == ["tumour"] and "'tumour'" in str(err.value) and "kidney_left" in str(err.value)
    with pytest.raises(ServerError) as missing:  # nothing was stored
        session.client.download_label("slicer_unknown", "final", tmp_path / "none.nii.gz")
    assert missing.value.status_code == 404

    result = session.submit(seg_path, image_id="slicer_unknown", drop_unknown=True)
    assert result.dropped_names == ["tumour"]
    stored = final_label(session, "slicer_unknown", tmp_path)
    assert np.array_equal(stored, np.where(truth == LABELS["liver"], LABELS["liver"], 0))


def test_submit_with_load_next_returns_the_next_sample(session, tmp_path):
    path, truth = add_phantom(session, tmp_path, "slicer_next", seed=305)
    shape, geometry = segio.read_image_geometry(path)
    seg_path = segio.write_seg_nrrd(
        tmp_path / "n.seg.nrrd", truth, geometry, [(n, v, colors.color_for(n)) for n, v in LABELS.items()]
    )
    result = session.submit(seg_path, image_id="slicer_next", load_next=True, strategy="random")
    assert result.next_sample is not None and result.next_sample.image_id != "slicer_next"
    assert Path(result.next_sample.path).is_file() and session.current is result.next_sample


def test_server_4xx_errors_carry_the_servers_message(session, tmp_path):
    with pytest.raises(ServerError) as err:
        session.client.next_sample("nope")
    assert err.value.status_code == 404 and "unknown strategy 'nope'" in err.value.message
    with pytest.raises(ServerError) as err:
        session.client.infer("nope", image_id="case_000")
    assert err.value.status_code == 404 and "unknown model 'nope'" in err.value.message

    wrong = np.zeros((10, 10, 5), dtype=np.uint8)
    label = segio.write_labelmap(tmp_path / "wrong.nii.gz", wrong, segio.Geometry())
    with pytest.raises(ServerError) as err:
        session.client.save_label("case_000", label)
    assert err.value.status_code == 422 and "label geometry does not match" in err.value.message
    assert str(err.value).startswith("HTTP 422: label geometry does not match")
    assert "refused the request" in describe_error(err.value)

    image = tmp_path / "case_000.nii.gz"
    sitk.WriteImage(make_phantom(1, **SMALL)[0], str(image))
    with pytest.raises(ServerError) as err:
        session.upload_image(str(image), "case_000")
    assert err.value.status_code == 409 and "already exists" in err.value.message


def test_server_down_raises_server_unreachable(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}"
    down = AnnotationSession(LabelLoopClient(url, retries=2, retry_delay=0.05), cache_dir=str(tmp_path))
    start = time.time()
    with pytest.raises(ServerUnreachable) as err:
        down.connect()
    assert time.time() - start < 5 and url in str(err.value)


def wait_for(poll, done, timeout: float, what: str):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = poll()
        if done(last):
            return last
        time.sleep(1.0)
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s; last: {last}")


def test_training_progress_polling_and_stop(session):
    session.train_start(params={"max_epochs": 1})
    first = session.poll_training()
    assert first.state in ("running", "done")
    progress = wait_for(session.poll_training, lambda p: p.state != "running", 900, "training")
    assert progress.state == "done", progress.details
    assert progress.fresh and progress.epoch == 1 and progress.total_epochs == 1
    assert progress.loss is not None and progress.loss > 0
    assert set(progress.dice) == set(LABELS)
    assert [h["epoch"] for h in progress.history] == [1]
    assert "epoch 1/1" in progress.summary()

    session.train_start(params={"max_epochs": 50})
    running = session.poll_training()
    assert running.state == "running" and not running.fresh  # no stats of the new run yet
    assert running.history == []
    session.train_stop()
    stopped = wait_for(session.poll_training, lambda p: p.state != "running", 120, "stopping")
    assert stopped.state == "stopped"


def test_batch_inference_start_and_poll(session):
    session.batch_infer_start("unlabeled")
    progress = wait_for(session.poll_batch, lambda p: p.state != "running", 900, "batch inference")
    assert progress.state == "done", progress.details
    assert progress.labeled_by_model >= 1 and progress.total >= progress.labeled_by_model
    assert "images have a model label" in progress.summary()
