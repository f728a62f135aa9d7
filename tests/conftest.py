"""Shared fixtures: synthetic studies and real ``monailabel start_server`` subprocesses on free loopback ports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest
import requests
import SimpleITK as sitk

from labelloop_app.devserver import Server, start_server, stop_server
from labelloop_app.synthetic import make_phantom

REPO = Path(__file__).resolve().parents[1]


def find_realdata() -> Path:
    """The real scans the tests read in place: ``$LABELLOOP_REALDATA``, else ``shared/realdata`` beside this
    checkout, else beside the checkout this one was cloned from (a CI clone in a scratch folder)."""
    if os.environ.get("LABELLOOP_REALDATA"):
        return Path(os.environ["LABELLOOP_REALDATA"])
    candidates = [REPO.parent / "shared" / "realdata"]
    origin = subprocess.run(
        ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        candidates.append(Path(origin).resolve().parent / "shared" / "realdata")
    return next((c for c in candidates if c.is_dir()), candidates[0])


REALDATA = find_realdata()
LABELS = {"liver": 1, "spleen": 2, "kidney_left": 3, "kidney_right": 4}

# Small enough for a 2-core CPU, large enough for the sliding window to slide.
FAST_CONF = {"roi_size": "48,48,32", "target_spacing": "3,3,4", "sw_batch_size": "2", "num_samples": "2"}


def write_case(folder: Path, name: str, seed: int, *, label_dir: Optional[Path] = None, **kw) -> Path:
    image, label = make_phantom(seed, **kw)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    if label_dir is not None:
        label_dir.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(label, str(label_dir / f"{name}.nii.gz"), useCompression=True)
    return path


SMALL = {"size": (64, 64, 32), "spacing": (5.0, 5.0, 8.0)}


def make_studies(root: Path, n_labeled: int = 4, n_unlabeled: int = 3) -> Path:
    """Small synthetic studies: ``n_labeled`` with final labels, then unlabeled ones, in several orientations."""
    studies = root / "studies"
    final = studies / "labels" / "final"
    orientations = ["RAS", "LPS", "LAS", "RAS"]
    for i in range(n_labeled + n_unlabeled):
        write_case(
            studies,
            f"case_{i:03d}",
            seed=100 + i,
            label_dir=final if i < n_labeled else None,
            orientation=orientations[i % len(orientations)],
            **SMALL,
        )
    return studies


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[Server]:
    """A LabelLoop server over a temporary copy of small synthetic studies (no model yet)."""
    root = tmp_path_factory.mktemp("server")
    studies = make_studies(root)
    # Scores only on request: background scoring after training would rewrite datastore_v2.json while the
    # session's tests compare snapshots of the studies folder (tests/test_active_learning.py covers scoring).
    s = start_server(studies, root / "models", root / "server.log", {**FAST_CONF, "auto_scoring": "false"})
    yield s
    stop_server(s)


@dataclass
class Trained:
    """The session server after a tiny training run, with what happened before it."""

    server: Server
    before_training: requests.Response
    task: dict

    def __getattr__(self, name):
        return getattr(self.server, name)


@pytest.fixture(scope="session")
def trained_server(server: Server) -> Trained:
    before = server.post("/infer/segmentation?image=case_000&output=json")
    task = server.train({"max_epochs": 2})
    return Trained(server, before, task)


def snapshot(folder: Path) -> Dict[str, str]:
    """Every file under ``folder`` (except the server's lock and model folders) with its content hash."""
    import hashlib

    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(".labelloop") and rel != ".lock":
            out[rel] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def datastore_json(studies: Path) -> dict:
    return json.loads((studies / "datastore_v2.json").read_text())


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def geometry(path: Path) -> tuple:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()


def assert_same_geometry(a: Path, b: Path) -> None:
    import numpy as np

    ga, gb = geometry(a), geometry(b)
    assert ga[0] == gb[0], f"size {ga[0]} != {gb[0]}"
    np.testing.assert_allclose(ga[1], gb[1], rtol=1e-5, err_msg="spacing")
    np.testing.assert_allclose(ga[2], gb[2], atol=1e-3, err_msg="origin")
    np.testing.assert_allclose(ga[3], gb[3], atol=1e-5, err_msg="direction")


def label_values(path: Path) -> List[int]:
    import numpy as np

    return np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist()


def run_cli(server_url: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``labelloop ARGS`` (``python -m LabelLoopLib.cli``) against the server at ``server_url``."""
    return subprocess.run(
        [sys.executable, "-m", "LabelLoopLib.cli", *args],
        cwd=REPO / "slicer_extension" / "LabelLoop",
        env=dict(os.environ, LABELLOOP_SERVER=server_url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
