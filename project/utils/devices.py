"""The device a fit trains on, and how a sweep's worker processes share the GPUs."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# a worker holds one CUDA context; two per GPU keep it busy while each in turn runs its Python
WORKERS_PER_GPU = 2


def training_device(accelerator: str = "auto") -> torch.device:
    """The device Lightning's Trainer trains on for ``accelerator`` (with ``devices=1``): the first
    CUDA GPU this process sees where there is one, else Apple's MPS where there is that, else the CPU."""
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return torch.device("cuda", 0)
    if torch.backends.mps.is_available() and accelerator in ("auto", "gpu", "mps"):
        return torch.device("mps")
    return torch.device("cpu")


def describe(device: torch.device) -> str:
    """``cpu``, or ``cuda (NVIDIA H100 80GB HBM3)``: what a run records of where it trained."""
    return f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as ``CUDA_VISIBLE_DEVICES`` names them (or their
    numbers where it is unset); none on a machine without CUDA."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in listed.split(",") if d.strip()] if listed is not None else []
    return names[:count] if listed is not None else [str(i) for i in range(count)]


def default_workers(cpus: int, gpus: int) -> int:
    """Worker processes for a sweep: about two per GPU, else one per CPU core."""
    return WORKERS_PER_GPU * gpus if gpus else max(1, cpus)


def worker_gpus(workers: int, gpus: list[str]) -> list[str | None]:
    """The GPU each worker is pinned to, round-robin over ``gpus`` (None each without one)."""
    return [gpus[i % len(gpus)] if gpus else None for i in range(workers)]


def pin_to(gpu: str | None) -> None:
    """Make ``gpu`` the only CUDA device this process sees (its ``cuda:0``); before CUDA starts."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


@contextlib.contextmanager
def deterministic_algorithms(setting: bool | str) -> Iterator[None]:
    """torch's deterministic algorithms as a Trainer with ``deterministic=setting`` sets them (true,
    "warn" or false), restored after."""
    enabled, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(setting is not False, warn_only=setting == "warn")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
