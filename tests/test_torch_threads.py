"""The inference thread count: restored after a background thread lowered its own, shared beside other work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from labelloop_app.cpu_load import CpuLoad, Ticks, busy_elsewhere, read_ticks
from labelloop_app.torch_threads import INFERENCE_THREADS, threads_beside, use_inference_threads


def run_in_new_thread(fn):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("value", fn()))
    t.start()
    t.join()
    return out["value"]


def test_a_thread_started_after_scoring_lowered_the_count_gets_it_back():
    lowered = threading.Event()
    release = threading.Event()

    def scorer():  # what background scoring does in its own thread
        torch.set_num_threads(1)
        lowered.set()
        release.wait(10)

    background = threading.Thread(target=scorer, daemon=True)
    background.start()
    lowered.wait(10)
    try:
        inherited = run_in_new_thread(torch.get_num_threads)
        restored = run_in_new_thread(lambda: (use_inference_threads(), torch.get_num_threads()))
    finally:
        release.set()
        background.join()
        torch.set_num_threads(INFERENCE_THREADS)
    assert INFERENCE_THREADS >= 1
    assert inherited == 1  # the pitfall: a new thread starts with the count the scorer set
    assert restored == (INFERENCE_THREADS, INFERENCE_THREADS)


def test_an_inference_beside_other_work_takes_an_equal_share_of_the_threads():
    assert threads_beside(0) == INFERENCE_THREADS
    assert threads_beside(-1) == INFERENCE_THREADS
    assert threads_beside(1) == max(1, INFERENCE_THREADS // 2)
    assert threads_beside(3) == max(1, INFERENCE_THREADS // 4)
    assert threads_beside(10 * INFERENCE_THREADS) == 1


def test_other_processes_busy_cores_leave_the_inference_the_rest():
    assert threads_beside(0, busy_cores=0.4) == INFERENCE_THREADS
    assert threads_beside(0, busy_cores=0.6) == max(1, INFERENCE_THREADS - 1)
    assert threads_beside(0, busy_cores=float(INFERENCE_THREADS)) == 1
    assert threads_beside(1, busy_cores=0.0) == max(1, INFERENCE_THREADS // 2)


def write_proc(proc: Path, busy: int, idle: int, own: int) -> None:
    """A fake ``/proc`` of two CPUs: ``busy`` ticks split over user and system, ``own`` this process's."""
    (proc / "self").mkdir(parents=True, exist_ok=True)
    per_cpu = f"{busy // 4} 0 {busy // 4} {idle // 2} 0 0 0 0 0 0"
    (proc / "stat").write_text(
        f"cpu  {busy // 2} 0 {busy - busy // 2} {idle} 0 0 0 0 0 0\ncpu0 {per_cpu}\ncpu1 {per_cpu}\nintr 1 2 3\n"
    )
    own_fields = f"S 1 1 1 0 -1 0 0 0 0 0 {own - own // 3} {own // 3} 0 0 20"
    (proc / "self" / "stat").write_text(f"42 (a (strange) name) {own_fields}")


def test_the_cores_other_processes_keep_busy_are_read_from_proc(tmp_path):
    write_proc(tmp_path, busy=1000, idle=1000, own=300)
    before = read_ticks(tmp_path)
    assert before == Ticks(busy=1000, total=2000, own=300, cpus=2)
    write_proc(tmp_path, busy=1300, idle=1100, own=350)  # 400 ticks pass: 300 busy, 50 of them this process's
    assert busy_elsewhere(before, read_ticks(tmp_path)) == pytest.approx(250 / 400 * 2)
    assert busy_elsewhere(before, before) is None
    assert read_ticks(tmp_path / "missing") is None


def test_the_sampler_follows_the_load(tmp_path):
    write_proc(tmp_path, busy=1000, idle=1000, own=0)
    load = CpuLoad(interval=0.05, proc=tmp_path)
    assert load.start() and not load.start()
    assert load.busy_cores == 0.0
    busy = 1000
    deadline = time.monotonic() + 10
    while load.busy_cores < 1.9 and time.monotonic() < deadline:  # both CPUs busy with other work
        busy += 100
        write_proc(tmp_path, busy=busy, idle=1000, own=0)
        time.sleep(0.02)
    assert load.busy_cores == pytest.approx(2.0)
    assert not CpuLoad(proc=tmp_path / "missing").start()
