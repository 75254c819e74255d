"""Trained members on disk: the registered model's name and arguments, each member's weights in the
plain module's layout, and the head's state. Reloading needs only the model registry, never the
code that trained it, and reads the file with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers, so a tampered file cannot run code when it is loaded."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from project.config import TrainConfig
from project.models import create_model
from project.utils import files
from project.validate import check_config


def model_record(
    config: TrainConfig,
    sample_shape: Sequence[int],
    out_features: int,
    folds: Sequence[int | None],
    net_state: dict[str, Tensor],
    head_state: dict[str, Tensor],
    **extra: object,
) -> bytes:
    """The file's contents. ``net_state``: the members' plain state_dict with a leading member
    dimension; ``extra``: plain values kept beside them (a trial's curves and fold scores)."""
    return files.torch_bytes(
        {
            "config": config.to_dict(),
            "sample_shape": list(sample_shape),
            "out_features": out_features,
            "folds": list(folds),
            "net": net_state,
            "head": head_state,
            **extra,
        }
    )


def save_model(
    path: Path,
    config: TrainConfig,
    sample_shape: Sequence[int],
    out_features: int,
    folds: Sequence[int | None],
    net_state: dict[str, Tensor],
    head_state: dict[str, Tensor],
) -> Path:
    """Written into a folder that ``files.atomic_folder`` renames into place once whole."""
    path.write_bytes(model_record(config, sample_shape, out_features, folds, net_state, head_state))
    return path


def read_record(data: bytes | Path) -> dict:
    """The saved record; raises where the file is not a whole one (truncated, or not torch's)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return torch.load(source, map_location="cpu", weights_only=True)


def members_of(saved: dict) -> tuple[list[nn.Module], TrainConfig]:
    """The record's members as plain modules (in eval mode), and their configuration."""
    config = check_config(TrainConfig(**saved["config"]))
    members = []
    for m in range(len(saved["folds"])):
        net = create_model(config.model, tuple(saved["sample_shape"]), saved["out_features"], **config.model_kwargs)
        net.load_state_dict({k: v[m] for k, v in saved["net"].items()})
        members.append(net.eval())
    return members, config


def load_model(path: Path) -> tuple[list[nn.Module], TrainConfig, dict]:
    """The members' plain modules (in eval mode), their configuration, and the saved record."""
    saved = read_record(path)
    members, config = members_of(saved)
    return members, config, saved
