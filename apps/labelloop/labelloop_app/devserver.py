"""Run a real LabelLoop server in a subprocess on a free loopback port: used by the tests and the benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import requests

APP_DIR = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running LabelLoop server: its URL, studies folder and log."""

    url: str
    studies: Path
    model_dir: Path
    log: Path
    process: subprocess.Popen
    conf: Dict[str, str] = field(default_factory=dict)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 300), **kw)

    def put(self, path: str, **kw) -> requests.Response:
        return requests.put(self.url + path, timeout=kw.pop("timeout", 120), **kw)

    def delete(self, path: str, **kw) -> requests.Response:
        return requests.delete(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def info(self) -> dict:
        r = self.get("/info/")
        r.raise_for_status()
        return r.json()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_task(self, kind: str = "train", timeout: float = 600, poll: float = 1.0, missing_ok: bool = False) -> dict:
        """Poll ``/train/``, ``/batch/infer`` or ``/scoring/`` (``kind``: train, batch_infer or scoring) until the
        latest task is no longer running; its last status. ``missing_ok``: no task of that kind yet (404) is idle."""
        path = {"train": "/train/", "batch_infer": "/batch/infer", "scoring": "/scoring/"}[kind]
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = self.get(path)
            if r.status_code == 404 and missing_ok:
                return {}
            if r.status_code == 200 and r.json().get("status") not in ("SUBMITTED", "RUNNING", "QUEUED"):
                return r.json()
            time.sleep(poll)
        raise AssertionError(f"{kind} did not finish in {timeout}s\n{self.log_tail()}")

    def train(self, params: Optional[dict] = None, timeout: float = 600) -> dict:
        r = self.post("/train/segmentation", json={"max_epochs": 2, **(params or {})})
        assert r.status_code == 200, r.text
        task = self.wait_task("train", timeout)
        assert task["status"] == "DONE", f"{task}\n{self.log_tail()}"
        return task


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so that the caller's ``finally: stop_server(...)`` runs: the server lives in
    its own session (so Ctrl-C in a terminal does not hit it twice) and would otherwise outlive a killed caller."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def start_server(studies: Path, model_dir: Path, log: Path, conf: Dict[str, str], timeout: float = 180) -> Server:
    _exit_on_sigterm()
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(APP_DIR),
        "--studies",
        str(studies),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--conf",
        "model_dir",
        str(model_dir),
    ]
    for k, v in conf.items():
        cmd += ["--conf", k, v]
    env = dict(os.environ, PYTHONUNBUFFERED="1", MONAI_LABEL_TRACKING_ENABLED="false")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    fh = open(log, "wb")
    process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=APP_DIR, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", studies, model_dir, log, process, conf)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}\n{server.log_tail()}")
        try:
            if requests.get(server.url + "/info/", timeout=5).status_code == 200:
                return server
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"server did not start in {timeout}s\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(timeout=10)


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process so far, in MiB (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmHWM not available")
