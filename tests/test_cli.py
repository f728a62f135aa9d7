"""Every ``labelloop`` subcommand end to end: ``python -m LabelLoopLib.cli`` against the session's trained server.

Anything a command adds to the session's datastore (an uploaded image, a submitted label) is removed again, so
the other tests find the datastore as they expect it.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import FAST_CONF, LABELS, REPO, datastore_json, make_studies, run_cli, start_server, stop_server
from labelloop_app.devserver import free_port

CLI_CWD = REPO / "slicer_extension" / "LabelLoop"


def cli(server_url: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return run_cli(server_url, *args, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    return res.stdout


def one_line_error(res: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert res.returncode == code, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_train_wait_reports_epochs_and_dice(trained_server):
    """First in this module, before ``cli_eval`` adds a final label: the run repeats the session fixture's
    (2 epochs over the same 4 labeled images), so the training statistics other tests read keep their shape."""
    out = ok(cli(trained_server.url, "train", "--epochs", "2", "--wait", "--poll", "1"))
    assert "training 'segmentation' started" in out
    assert "Done | epoch 2/2" in out and "Dice: liver" in out


# --- an image whose metrics are known by construction -----------------------------------------------------

SPACING = (1.5, 1.0, 2.0)  # x, y, z in mm
N, K = 12, 2  # liver: a 12-voxel cube, the prediction shifted by 2 voxels along x


def cube_labels(shift_x: int) -> np.ndarray:
    label = np.zeros((24, 32, 32), dtype=np.uint8)  # (z, y, x)
    label[4 : 4 + N, 4 : 4 + N, 4 + shift_x : 4 + N + shift_x] = LABELS["liver"]
    label[4:10, 20:26, 20:26] = LABELS["spleen"]
    return label


def write(array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin((-20.0, 10.0, 5.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def eval_case(trained_server, tmp_path_factory) -> Iterator[dict]:
    """``cli_eval`` added with ``upload``; its ``final`` and ``original`` labels stored with ``submit``."""
    folder = tmp_path_factory.mktemp("cli_eval")
    image = write(np.full((24, 32, 32), -100, dtype=np.int16), folder / "cli_eval.nii.gz")
    final = write(cube_labels(0), folder / "final.nii.gz")
    original = write(cube_labels(K), folder / "original.nii.gz")
    url = trained_server.url
    uploaded = cli(url, "upload", str(image))
    try:
        submitted = [
            cli(url, "submit", "cli_eval", str(final)),
            cli(url, "submit", "cli_eval", str(original), "--tag", "original"),
        ]
        yield {"upload": uploaded, "submit": submitted, "final": final}
    finally:
        trained_server.delete("/datastore/image?id=cli_eval")


def test_upload_and_submit_by_name(trained_server, eval_case):
    assert ok(eval_case["upload"]).strip().split("\t")[0] == "cli_eval"
    final, original = eval_case["submit"]
    assert "stored 'final' label for cli_eval: liver 1728, spleen 216 voxels" in ok(final)
    assert "stored 'original' label for cli_eval" in ok(original)
    labels = datastore_json(trained_server.studies)["objects"]["cli_eval"]["labels"]
    assert {"final", "original"} <= set(labels)
    stored = sitk.GetArrayFromImage(
        sitk.ReadImage(str(trained_server.studies / "labels" / "final" / "cli_eval.nii.gz"))
    )
    assert np.array_equal(stored, cube_labels(0))


def test_evaluate_gives_the_dice_and_hd95_known_by_construction(trained_server, eval_case, tmp_path):
    out = ok(
        cli(
            trained_server.url,
            "evaluate",
            "--images",
            "cli_eval",
            "--out",
            str(tmp_path / "m.csv"),
            "--plot",
            str(tmp_path / "m.png"),
        )
    )
    assert "original vs final" in out and "worst cases" in out
    rows = {r["label"]: r for r in csv.DictReader(open(tmp_path / "m.csv"))}
    assert set(rows) == set(LABELS)
    assert float(rows["liver"]["dice"]) == pytest.approx((N - K) / N, abs=1e-4)
    assert float(rows["liver"]["hd95_mm"]) == pytest.approx(K * SPACING[0], abs=1e-3)
    assert float(rows["liver"]["vol_diff_ml"]) == pytest.approx(0.0)
    assert float(rows["liver"]["ref_ml"]) == pytest.approx(N**3 * np.prod(SPACING) / 1000.0, abs=1e-3)
    assert float(rows["spleen"]["dice"]) == 1.0 and float(rows["spleen"]["hd95_mm"]) == 0.0
    assert rows["kidney_left"]["note"] == "absent in both" and rows["kidney_left"]["dice"] == ""
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_export_writes_every_label_of_the_tag(trained_server, eval_case, tmp_path):
    out = ok(cli(trained_server.url, "export", "--tag", "final", "--out", str(tmp_path / "final")))
    final_dir = trained_server.studies / "labels" / "final"
    expected = {p.name for p in final_dir.glob("*.nii.gz")}
    assert f"exported {len(expected)} 'final' label(s)" in out
    for name in expected:
        assert (tmp_path / "final" / name).read_bytes() == (final_dir / name).read_bytes()
    assert (tmp_path / "final" / "labels.json").read_text().count('"liver": 1') == 1


def test_status_lists_server_models_strategies_progress_and_training(trained_server):
    out = ok(cli(trained_server.url, "status"))
    assert f"Server      {trained_server.url}" in out
    assert "Structures  liver=1, spleen=2, kidney_left=3, kidney_right=4" in out
    assert "Model       segmentation (segmentation, unet, CT): trained, version" in out
    assert "Strategies  random, first" in out
    assert "images labeled (final)" in out
    assert "Training    segmentation:" in out and "Dice: liver" in out


def test_batch_infer_wait_status_and_stop(trained_server):
    url = trained_server.url
    out = ok(cli(url, "batch-infer", "--images", "case_001", "case_006", "--wait", "--device", "cpu"))
    assert "2 image(s) with model 'segmentation' on cpu" in out
    assert "DONE: 2/2 images stored as 'original'" in out and "0 failed" in out
    assert ok(cli(url, "batch-status")).startswith("DONE: 2/2 images, 0 failed")
    assert "no batch inference is running" in ok(cli(url, "batch-stop"))


def test_next_downloads_the_image(trained_server, tmp_path):
    lines = ok(cli(trained_server.url, "next", "--download", str(tmp_path))).splitlines()
    image_id, path = lines
    assert image_id in datastore_json(trained_server.studies)["objects"]
    assert Path(path).read_bytes() == (trained_server.studies / f"{image_id}.nii.gz").read_bytes()


def test_help_on_every_subcommand():
    commands = ["status", "batch-infer", "batch-status", "batch-stop", "next", "queue", "upload", "submit"]
    for command in [*commands, "classify", "submit-class", "classes", "train", "export", "evaluate"]:
        res = cli("http://127.0.0.1:1", command, "--help")
        assert res.returncode == 0 and f"usage: labelloop {command}" in res.stdout, res.stderr
    assert "Exit codes:" in cli("http://127.0.0.1:1", "--help").stdout


def test_errors_are_one_line_with_documented_exit_codes(trained_server, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"
    one_line_error(cli(down, "status"), 3, "not reachable", "connection refused")
    one_line_error(cli(trained_server.url, "batch-infer", "--model", "nope"), 1, "unknown model 'nope'")
    one_line_error(cli(trained_server.url, "batch-infer", "--images", "case_000", "no_such"), 1, "'no_such'")
    one_line_error(cli(trained_server.url, "upload", str(tmp_path / "missing.nii.gz")), 2, "no such file")
    one_line_error(cli(trained_server.url, "batch-infer", "--images", "all", "case_000"), 2, "not both")
    one_line_error(cli(trained_server.url, "evaluate", "--pred-tag", "final"), 2, "must differ")
    assert cli(trained_server.url, "status", "--bogus").returncode == 2


def test_output_to_a_reader_that_stopped_ends_quietly(trained_server):
    """``labelloop status | head -1``: the reader closes the pipe before the command has written; no error."""
    env = dict(os.environ, LABELLOOP_SERVER=trained_server.url)
    p = subprocess.Popen(
        [sys.executable, "-m", "LabelLoopLib.cli", "status"],
        cwd=CLI_CWD,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    p.stdout.close()
    assert p.wait(timeout=120) == 0
    assert p.stderr.read() == b""


def test_a_label_file_that_is_not_one_is_a_usage_error_and_nothing_is_stored(trained_server, tmp_path):
    """The scan itself given as its label, a file no reader knows, and a broken .seg.nrrd: one line each, exit 2."""
    before = datastore_json(trained_server.studies)
    scan = trained_server.studies / "case_005.nii.gz"
    garbage = tmp_path / "case_005_label.nii.gz"
    garbage.write_bytes(b"not an image")
    seg = tmp_path / "case_005.seg.nrrd"
    seg.write_bytes(b"not a segmentation")
    url = trained_server.url
    one_line_error(cli(url, "submit", "case_005", str(scan)), 2, "case_005.nii.gz", "negative values", "the scan")
    one_line_error(cli(url, "submit", "case_005", str(garbage)), 2, "case_005_label.nii.gz", "not a readable image")
    one_line_error(cli(url, "submit", "case_005", str(seg)), 2, "case_005.seg.nrrd", "NRRD")
    assert datastore_json(trained_server.studies) == before


def test_server_option_overrides_the_environment(trained_server):
    res = subprocess.run(
        [sys.executable, "-m", "LabelLoopLib.cli", "status", "--server", trained_server.url],
        cwd=CLI_CWD,
        env=dict(os.environ, LABELLOOP_SERVER="http://127.0.0.1:1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert f"Server      {trained_server.url}" in ok(res)


def test_a_time_budget_alone_ends_the_run_and_progress_is_shown_in_time(tmp_path):
    """``--minutes`` without ``--epochs``: the server lifts the epoch cap, so the budget ends the run (the stats say
    ``until_budget``) and progress is counted in seconds; with ``--epochs`` too, whichever comes first ends it."""
    studies = make_studies(tmp_path, n_labeled=2, n_unlabeled=0)
    server = start_server(studies, tmp_path / "models", tmp_path / "server.log", {**FAST_CONF, "auto_scoring": "false"})
    try:
        out = ok(cli(server.url, "train", "--minutes", "0.2", "--wait", "--poll", "1", "--quiet"))
        stats = server.info()["train_stats"]["segmentation"]
        assert stats["until_budget"] is True and stats["max_minutes"] == 0.2
        assert 1 <= stats["epoch"] < stats["total_epochs"], "the epoch cap ended the run, not the budget"
        assert 12 <= stats["elapsed_seconds"] < 60, "the stats stop before the budget ran out"
        assert [e["epoch"] for e in stats["history"]] == list(range(1, len(stats["history"]) + 1))
        assert f"Done | epoch {stats['epoch']} | " in out and "/0.2 min" in out

        ok(cli(server.url, "train", "--minutes", "5", "--epochs", "1", "--wait", "--poll", "1", "--quiet"))
        stats = server.info()["train_stats"]["segmentation"]
        assert stats["until_budget"] is False and (stats["epoch"], stats["total_epochs"]) == (1, 1)
    finally:
        stop_server(server)
