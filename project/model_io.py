"""Trained members on disk: the registered model's name and arguments, each member's weights in the
plain module's layout, and the head's state. Reloading needs only the model registry, never the
code that trained it, and reads the file with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers, so a tampered file cannot run code when it is loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from project.models import create_model
from project.tasks import TrainConfig


def save_model(path: Path, config: TrainConfig, sample_shape: tuple[int, ...], out_features: int,
               folds: list[int | None], net_state: dict[str, Tensor], head_state: dict[str, Tensor]) -> Path:
    """``net_state``: the members' plain state_dict with a leading member dimension."""
    torch.save({"config": config.to_dict(), "sample_shape": list(sample_shape), "out_features": out_features,
                "folds": list(folds), "net": net_state, "head": head_state}, path)
    return path


def load_model(path: Path) -> tuple[list[nn.Module], TrainConfig, dict]:
    """The members' plain modules (in eval mode), their configuration, and the saved record."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = TrainConfig(**saved["config"])
    members = []
    for m in range(len(saved["folds"])):
        net = create_model(config.model, tuple(saved["sample_shape"]), saved["out_features"], **config.model_kwargs)
        net.load_state_dict({k: v[m] for k, v in saved["net"].items()})
        members.append(net.eval())
    return members, config, saved
