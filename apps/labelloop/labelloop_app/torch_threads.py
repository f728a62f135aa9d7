"""PyTorch's intra-op thread count for inference threads.

``torch.set_num_threads`` acts on the calling thread, but it also becomes the starting value of every thread
created after it. Background scoring runs with one thread so as not to starve inference; without a reset, a batch
thread or a web-server worker started after it would inherit that one thread and run the network at half speed on
a two-core machine. Threads that run inference call :func:`use_inference_threads` first.
"""

from __future__ import annotations

import torch

INFERENCE_THREADS = torch.get_num_threads()
"""The process's thread count when LabelLoop was imported, before any thread lowered it."""


def use_inference_threads() -> int:
    """Give the calling thread the process's full intra-op thread count; returns it."""
    if torch.get_num_threads() != INFERENCE_THREADS:
        torch.set_num_threads(INFERENCE_THREADS)
    return INFERENCE_THREADS
