"""The newcomer's first command, ``make run``: it generates the sample data and serves it, whatever ``python`` the
shell finds first (here one without MONAI Label, as on a machine where the venv is not activated)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from labelloop_app.devserver import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = "--small --n-seg 2 --n-seg-labeled 1 --n-seg-heldout 0 --n-cls 2 --n-cls-labeled 2 --n-cls-heldout 0"


def _path_without_the_venv() -> str:
    """PATH without the folder of the interpreter running the tests, so ``python`` there lacks MONAI Label."""
    venv_bin = str(Path(sys.executable).parent)
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)


def test_make_run_generates_the_sample_data_and_serves_it(tmp_path):
    port = free_port()
    sample = tmp_path / "sample-data"
    args = [
        "make",
        "-C",
        str(REPO),
        "run",
        f"VENV={sys.prefix}",
        f"SAMPLE_DATA={sample}",
        f"SAMPLE_ARGS={TINY} --no-progress --workers 1",
        f"PORT={port}",
        "CONF=--conf auto_scoring false",
    ]
    env = dict(os.environ, PATH=_path_without_the_venv(), MONAI_LABEL_TRACKING_ENABLED="false")
    log = tmp_path / "make-run.log"
    with open(log, "wb") as fh:
        process = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        info = None
        deadline = time.time() + 300
        while info is None and time.time() < deadline and process.poll() is None:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/info/", timeout=5)
                info = r.json() if r.status_code == 200 else None
            except requests.ConnectionError:
                time.sleep(1)
        assert info is not None, f"make run exited with {process.poll()}\n{log.read_text(errors='replace')[-3000:]}"
        assert "segmentation" in info["models"] and "random" in info["strategies"]
        images = requests.get(f"http://127.0.0.1:{port}/datastore/?output=all", timeout=30).json()["objects"]
        served = {p.name.split(".")[0] for p in (sample / "segmentation").glob("*.nii.gz")}
        assert set(images) == served and len(served) == 2
        assert sum(1 for o in images.values() if "final" in o.get("labels", {})) == 1
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
