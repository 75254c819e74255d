"""A task is a preset made usable: its DataModule, the head of its kind, a training configuration
per model."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch
from torch import Tensor

from project.config import Preset, TrainConfig, preset_path
from project.config.schema import Direction
from project.data import TARGET_TRANSFORMS, FoldDataModule, data_kind
from project.engine import ClassificationHead, RegressionHead
from project.engine.heads import Head
from project.validate import check_config, load_preset


class Task:
    """What ``experiments/configs/<name>.yaml`` (or any preset file) describes."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset

    @property
    def name(self) -> str:
        return self.preset.name

    @property
    def kind(self) -> str:
        """ "regression" or "classification"."""
        return self.preset.kind

    @property
    def metric(self) -> str:
        """The validation metric the sweep optimises."""
        return self.preset.metric

    @property
    def direction(self) -> Direction:
        """ "minimize" or "maximize"."""
        return self.preset.direction

    @property
    def folds(self) -> int:
        return self.preset.folds

    @property
    def default_model(self) -> str:
        return self.preset.model

    @property
    def refits(self) -> bool:
        """Whether the test rows are predicted by a refit on every training row (the image tasks),
        rather than by the fold models' average."""
        return self.preset.final.refit

    @property
    def seeds(self) -> int:
        """The refit's members, which differ only in their seeds."""
        return self.preset.final.seeds

    def config(self, model: str | None = None, **overrides) -> TrainConfig:
        """The preset's configuration for ``model`` (default: the preset's), with ``overrides``."""
        model = model or self.default_model
        settings = self.preset.model_preset(model)
        kwargs = {**settings.args, **overrides.pop("model_kwargs", {})}
        augment = dataclasses.asdict(self.preset.data.augment)  # the image task's, beneath the model's
        return check_config(
            TrainConfig(**{**augment, **settings.train, **overrides, "model": model, "model_kwargs": kwargs})
        )

    def datamodule(
        self,
        data_dir: str | Path,
        n_folds: int | None = None,
        fold=0,
        seed: int = 0,
        replicas: int = 1,
        batch_size: int = 64,
    ) -> FoldDataModule:
        data = self.preset.data
        common = dict(
            dataset=data.dataset,
            data_dir=data_dir,
            n_folds=n_folds or self.folds,
            fold=fold,
            seed=seed,
            replicas=replicas,
            batch_size=batch_size,
            stratified=self.preset.is_stratified,
        )
        return data_kind(data.kind).from_preset(self.preset, **common)

    def prepared(self, data_dir: str | Path, **kwargs) -> FoldDataModule:
        """``datamodule(data_dir, **kwargs)`` with its data fetched and its folds prepared."""
        datamodule = self.datamodule(data_dir, **kwargs)
        datamodule.prepare_data()
        datamodule.setup()
        return datamodule

    def head(self, config: TrainConfig, member_targets: list[Tensor]) -> Head:
        """The head of a stack whose members train on ``member_targets``: regression predicts
        relative to each member's training mean."""
        members = len(member_targets)
        if self.kind == "regression":
            offset = torch.stack([t.float().mean() for t in member_targets])
            original = self.preset.metric_scale == "original"
            inverse = TARGET_TRANSFORMS[self.preset.data.target_transform].inverse if original else None
            return RegressionHead(members, offset, loss=config.loss, metric=self.metric, inverse=inverse)
        return ClassificationHead(members, label_smoothing=config.label_smoothing, metric=self.metric)


@functools.cache
def get_task(name: str) -> Task:
    """The task of ``experiments/configs/<name>.yaml``."""
    return Task(load_preset(preset_path(name)))
