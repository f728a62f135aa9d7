"""PyTorch's intra-op thread count for inference threads.

``torch.set_num_threads`` acts on the calling thread, but it also becomes the starting value of every thread
created after it. Background scoring runs with one thread so as not to starve inference; without a reset, a batch
thread or a web-server worker started after it would inherit that one thread and run the network at half speed on
a two-core machine. Threads that run inference call :func:`use_inference_threads` first.

An inference that shares the CPU with other work takes a share of the threads, not all of them. PyTorch's threads
meet at the end of every layer, and those that wait spin before they sleep (OpenMP's default wait policy). With
more busy threads than cores, each layer waits for a thread that has no core while the spinning ones hold the
cores: on two cores, an occlusion map's batches ran 5 to 28 times slower with two threads beside a training
process than alone, and 1.7 times slower with one (``benchmarks/cpu_sharing.py``).
"""

from __future__ import annotations

import math

import torch

CPU_THREADS = "cpu_threads"
"""The request and result key of an inference's thread count (the result says what the inference used)."""

INFERENCE_THREADS = torch.get_num_threads()
"""The process's thread count when LabelLoop was imported, before any thread lowered it."""


def threads_beside(others: int, busy_cores: float = 0.0) -> int:
    """The threads an inference takes while ``others`` CPU-bound jobs of this server run beside it and other
    processes keep ``busy_cores`` cores busy: all of them alone; else an equal share among the jobs, and no more
    than the cores the other processes leave (a core counts when they use over half of it); at least one."""
    share = INFERENCE_THREADS // (1 + max(0, int(others)))
    left = INFERENCE_THREADS - math.floor(max(0.0, busy_cores) + 0.5)
    return max(1, min(share, left))


def use_threads(threads: int) -> int:
    """Set the calling thread's intra-op thread count (when it differs); returns it."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def use_inference_threads() -> int:
    """Give the calling thread the process's full intra-op thread count; returns it."""
    return use_threads(INFERENCE_THREADS)
