"""A PyTorch Lightning template for K-fold studies: what a user scripts against, by name.

    from pathlib import Path

    from project import cross_validate, get_task, load_predictor

    task = get_task("house-prices")                 # a preset made usable
    dm = task.datamodule("data", fold=0)            # one fold's DataModule: (x, y) batches
    result = cross_validate(task, task.config())    # the K folds at once, through the engine
    predictor = load_predictor(Path("experiments/outputs/house-prices/model"))  # after a sweep

Everything else in the package is internal and may move; the layers are listed in README.md.
Names are imported when first used, so that ``import project.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_API = {
    "get_task": "project.tasks",  # a task by its preset's name
    "Task": "project.tasks",  # a preset made usable: its DataModule, head and configurations
    "load_preset": "project.validate",  # a preset file of one's own, read and checked
    "TrainConfig": "project.config",  # one point of a search space
    "cross_validate": "project.cv",  # K-fold CV of one configuration, the folds stacked where it pays
    "CVResult": "project.cv",
    "PlainModule": "project.reference",  # the plain LightningModule of one fold, for a plain Trainer
    "register_model": "project.models",  # @register_model("name") on an nn.Module of one's own
    "create_model": "project.models",
    "register_data_kind": "project.data",  # @register_data_kind("name") on a DataModule of one's own
    "SweepSettings": "project.sweep.study",  # what a sweep runs: its preset, storage, folds, workers
    "run_sweep": "project.sweep.run",  # an Optuna sweep under K-fold CV, then its deliverables
    "load_predictor": "project.artifacts.predictor",  # a saved model folder, raw inputs in, predictions out
}

__all__ = [
    "CVResult",
    "PlainModule",
    "SweepSettings",
    "Task",
    "TrainConfig",
    "create_model",
    "cross_validate",
    "get_task",
    "load_predictor",
    "load_preset",
    "register_data_kind",
    "register_model",
    "run_sweep",
]

if TYPE_CHECKING:
    from project.artifacts.predictor import load_predictor
    from project.config import TrainConfig
    from project.cv import CVResult, cross_validate
    from project.data import register_data_kind
    from project.models import create_model, register_model
    from project.reference import PlainModule
    from project.sweep.run import run_sweep
    from project.sweep.study import SweepSettings
    from project.tasks import Task, get_task
    from project.validate import load_preset


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'project' has no attribute {name!r}; its public names are {', '.join(__all__)}")
    return getattr(importlib.import_module(_API[name]), name)
