"""How the engine times the ways it could run a step, to choose the faster (``layout.py``,
``stacked_mlp.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def best_seconds(step: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``step`` on ``device``, after one more that pays for
    allocations and kernel choices; a GPU's queued work is waited for."""
    timings = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    return min(timings[1:])
