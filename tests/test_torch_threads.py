"""The inference thread count survives a background thread that lowered its own."""

from __future__ import annotations

import threading

import torch

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
