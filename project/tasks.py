"""The tasks the template ships, and one training configuration."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from project.data import FashionMNISTDataModule, FoldDataModule, HousePricesDataModule, MNISTDataModule, PreprocessOptions
from project.engine.optim import OPTIMIZERS, SCHEDULERS
from project.models import ClassificationHead, RegressionHead
from project.models.registry import check_model_kwargs, model_class

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


@dataclass(frozen=True)
class Task:
    name: str
    datamodule: type[FoldDataModule]
    kind: str  # "regression" or "classification"
    metric: str  # the validation metric the sweep optimises
    direction: str  # "minimize" or "maximize"
    out_features: int
    datamodule_kwargs: dict = field(default_factory=dict)
    # per model: the TrainConfig fields of a single run (train.py); the first is the task's default model
    defaults: dict[str, dict] = field(default_factory=dict)
    ensemble: int = 1  # members, differing only in their seeds, whose average the final refit scores

    @property
    def default_model(self) -> str:
        return next(iter(self.defaults), "mlp")

    def config(self, model: str | None = None, **overrides) -> TrainConfig:
        """The task's configuration for ``model`` (default: the task's), with ``overrides``."""
        model = model or self.default_model
        defaults = self.defaults.get(model, {})
        kwargs = {**defaults.get("model_kwargs", {}), **overrides.pop("model_kwargs", {})}
        return TrainConfig(**{**defaults, **overrides, "model": model, "model_kwargs": kwargs})

    def head(self, config: TrainConfig, member_targets: list[Tensor]) -> nn.Module:
        """The head of a stack whose members train on ``member_targets``: regression predicts
        relative to each member's training mean."""
        members = len(member_targets)
        if self.kind == "regression":
            offset = torch.stack([t.float().mean() for t in member_targets])
            return RegressionHead(members, offset, loss=config.loss)
        return ClassificationHead(members, label_smoothing=config.label_smoothing)


_IMAGE_DEFAULTS = {
    "mlp": {"model_kwargs": {"hidden_sizes": (256, 256), "dropout": 0.2}, "batch_size": 256, "max_epochs": 20,
            "lr": 1e-3},
    "cnn": {"model_kwargs": {"channels": (32, 64), "hidden": 128, "dropout": 0.25}, "batch_size": 128,
            "max_epochs": 12, "lr": 3e-3, "weight_decay": 1e-4, "scheduler": "onecycle", "label_smoothing": 0.1},
}
TASKS = {
    # preprocessing chosen on 5-fold CV (see README): numeric columns clipped to their training
    # 0.5-99.5% range, categories seen fewer than 10 times grouped, the two partial-sale outliers
    # dropped from training parts
    "house-prices": Task("house-prices", HousePricesDataModule, "regression", "rmse", "minimize", 1,
                         {"drop_outliers": True,
                          "options": PreprocessOptions(clip_quantile=0.005, min_frequency=10)},
                         {"mlp": {"model_kwargs": {"hidden_sizes": (256,), "dropout": 0.1}, "batch_size": 64,
                                  "max_epochs": 100, "lr": 1e-3, "weight_decay": 1e-2}}),
    # the final refit averages 3 seeds (README)
    "fashion-mnist": Task("fashion-mnist", FashionMNISTDataModule, "classification", "acc", "maximize", 10,
                          defaults=_IMAGE_DEFAULTS, ensemble=3),
    "mnist": Task("mnist", MNISTDataModule, "classification", "acc", "maximize", 10, defaults=_IMAGE_DEFAULTS,
                  ensemble=3),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task {name!r} is unknown: expected one of {', '.join(TASKS)}")
    return TASKS[name]

