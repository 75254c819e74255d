"""A task is a preset made usable (its DataModule, the head of its kind, a training configuration
per model), and one training configuration."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor, nn

from project import presets
from project.data import (
    TARGET_TRANSFORMS,
    FoldDataModule,
    IdxDataModule,
    ImageFolderDataModule,
    TableDataModule,
    TabularSpec,
)
from project.data.tabular import check_frame
from project.engine import ClassificationHead, RegressionHead
from project.engine.optim import OPTIMIZERS, SCHEDULERS
from project.models.registry import check_model_kwargs, model_class
from project.presets import Preset

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")


@dataclass
class TrainConfig:
    """One point of the search space: the model and everything that defines its fit, the data split
    excepted. ``model_kwargs`` are the registered model's own arguments (``project.models``)."""

    model: str = "mlp"
    model_kwargs: dict = field(default_factory=dict)
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9  # SGD only
    scheduler: str = "none"
    batch_size: int = 64
    max_epochs: int = 100
    loss: str = "mse"  # regression only: "mse" or "huber"
    label_smoothing: float = 0.0  # classification only
    translate: int = 0  # images only: random shift of each training image by up to this many pixels
    gradient_clip_val: float | None = None  # each fold's gradient norm is clipped to this
    precision: str = "32-true"

    def __post_init__(self) -> None:
        self.model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in self.model_kwargs.items()}
        checks = [
            (self.lr > 0, "lr", "a positive number"),
            (self.weight_decay >= 0, "weight_decay", "a non-negative number"),
            (self.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
            (self.scheduler in SCHEDULERS, "scheduler", f"one of {', '.join(SCHEDULERS)}"),
            (self.batch_size >= 1, "batch_size", "at least 1"),
            (self.max_epochs >= 1, "max_epochs", "at least 1"),
            (0 <= self.label_smoothing < 1, "label_smoothing", "a value in [0, 1)"),
            (0 <= self.translate <= 8, "translate", "0 to 8 pixels"),
            (self.gradient_clip_val is None or self.gradient_clip_val > 0, "gradient_clip_val", "a positive number"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")
        model_class(self.model)
        check_model_kwargs(self.model, self.model_kwargs)

    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict:
        """One level of keys (``model_kwargs`` as ``model.<name>``), as MLflow parameters."""
        values = self.to_dict()
        kwargs = values.pop("model_kwargs")
        return {**values, **{f"model.{k}": v for k, v in kwargs.items()}}


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
    def direction(self) -> str:
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
    def ensemble(self) -> int:
        """The refit's members, which differ only in their seeds."""
        return self.preset.final.ensemble

    def config(self, model: str | None = None, **overrides) -> TrainConfig:
        """The preset's configuration for ``model`` (default: the preset's), with ``overrides``."""
        model = model or self.default_model
        settings = self.preset.model_preset(model)
        kwargs = {**settings.args, **overrides.pop("model_kwargs", {})}
        return TrainConfig(**{**settings.train, **overrides, "model": model, "model_kwargs": kwargs})

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
        if data.kind == "csv":
            return TableDataModule(
                self.table_spec(),
                kind=self.kind,
                target_transform=data.target_transform,
                options=data.preprocess,
                drop_train_rows=data.drop_train_rows,
                train_file=data.train or "train.csv",
                test_file=data.test or "test.csv",
                **common,
            )
        if data.kind == "idx":
            return IdxDataModule(**common)
        return ImageFolderDataModule(
            train_dir=data.train or "train", test_dir=data.test or "test", image_size=data.image_size, **common
        )

    def table_spec(self) -> TabularSpec:
        """How a CSV task's columns are read."""
        data = self.preset.data
        return TabularSpec(
            id_column=data.id,
            target=data.target,
            numeric=None if data.numeric is None else tuple(data.numeric),
            categorical=tuple(data.categorical),
            ordinal=dict(data.ordinal),
            derive=presets.derive_function(data.derive, self.preset.source),
        )

    def prepare_rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw table rows as reading the test file makes them (numbers where the preset says so),
        whether they come from a file or a request."""
        return check_frame(frame.copy(), self.table_spec(), Path("input rows"), with_target=False)

    def head(self, config: TrainConfig, member_targets: list[Tensor]) -> nn.Module:
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
    return Task(presets.load(presets.preset_path(name)))
