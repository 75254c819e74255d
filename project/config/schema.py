"""The schema of every configuration: a preset (what a task is, from its data to its sweep and
submission) and a training configuration (one point of its search space).

Plain dataclasses, enforced by OmegaConf when a preset is read (``project.config.loading``); the
checks against the rest of the project (models, estimators, data files) are ``project.validate``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from omegaconf import MISSING

KINDS = ("regression", "classification")
METRICS = {"regression": ("rmse", "mae"), "classification": ("acc", "logloss", "auc")}
HIGHER_IS_BETTER = {"rmse": False, "mae": False, "acc": True, "logloss": False, "auc": True}
TRANSFORMS = ("none", "log", "log1p")
DETERMINISTIC = (True, False, "warn")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle")
# what a sweep's submission is made of: an ensemble of its trials and the preset's estimators
# (greedy), of its trials alone (trials), or its best trial alone (none); project/sweep/export.py
ENSEMBLES = ("greedy", "trials", "none")
Direction = Literal["minimize", "maximize"]
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)


@dataclass
class PreprocessOptions:
    """Knobs of the per-fold preprocessing (every statistic is fitted on the training rows)."""

    skew_threshold: float | None = 0.75  # log1p numeric columns whose training skewness exceeds this
    min_frequency: int = 1  # categories rarer than this in the training rows share one level
    scaler: str = "standard"  # "robust", or "quantile": each column mapped to a standard normal through its quantiles
    missing_indicators: bool = True
    clip_quantile: float | None = None  # clip numeric columns to the training rows' [q, 1 - q] quantiles


class PresetError(ValueError):
    """A preset that cannot be used; the message names the file, the key and what was expected."""


@dataclass
class Augment:
    """Augmentation of an image task's training images (project/data/augment.py): the defaults
    of every model's training settings of the same names, which a sweep may search."""

    translate: int = 0  # a random crop of the image padded by this many pixels: a shift of up to it each way
    flip: bool = False  # mirror each image left to right, with probability one half
    erase: float = 0.0  # the probability of blanking one random rectangle of the image
    tta_flip: bool = False  # test-time augmentation: each prediction averages the image's and its mirror image's

    def __bool__(self) -> bool:
        """Whether training images are augmented (``tta_flip`` is not about training images)."""
        return bool(self.translate or self.flip or self.erase)


@dataclass
class Data:
    kind: str = "csv"  # a registered data kind: csv | idx | image-folder, or one of your own
    dataset: str = MISSING  # the folder under --data-dir (and its pinned checksums in data/checksums.json, if any)
    train: str | None = None  # csv: the training file (train.csv); image-folder: its folder (train/<class>/...)
    test: str | None = None  # csv: the test file (test.csv); image-folder: test/<class>/... or test/... unlabelled
    id: str | None = None  # csv: the row id column
    target: str | None = None  # csv: the target column
    target_transform: str = "none"  # regression: none | log | log1p; the model learns the transformed target
    # how to read other columns, where the file has them:
    numeric: list[str] | None = None  # columns that must hold numbers (default: whatever reads as numbers)
    categorical: list[str] = field(default_factory=list)  # columns read as categories even when they hold numbers
    ordinal: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> level -> number
    derive: str | None = None  # "module:function" adding row-wise features to a DataFrame
    drop_train_rows: str | None = None  # a pandas query: training-part rows to leave out (never validation rows)
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    image_size: list[int] | None = None  # image-folder: [height, width] to resize to (default: the images' own)
    augment: Augment = field(default_factory=Augment)  # images: training images varied, predictions mirror-averaged


@dataclass
class SearchParam:
    """One searched setting: a range (``low``/``high``, ``log``, ``step``), ``choices``, hidden layers
    (``depth`` and ``width`` ranges, giving ``(width,) * depth``) or a sampled integer times each of
    ``times`` (channels ``(c, 2c)``); ``when`` names an earlier setting it is searched only beside."""

    low: Any = None  # integers sample integers, decimals floats, as written
    high: Any = None
    log: bool = False
    step: Any = None
    choices: list[Any] | None = None
    depth: list[int] | None = None
    width: list[int] | None = None
    times: list[int] | None = None
    when: str | None = None
    name: str | None = None  # the Optuna parameter (default: the setting without its "model." prefix)


@dataclass
class ModelPreset:
    """One model of the task: its arguments, its training settings, what a sweep searches, and the
    first trial of a new study (in the search's parameter names)."""

    args: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    search: dict[str, SearchParam] = field(default_factory=dict)
    start: dict[str, Any] = field(default_factory=dict)


@dataclass
class Estimator:
    """A scikit-learn model that joins the study's ensemble library beside its trials: fitted on the
    same folds and features (each fold's own preprocessing), once per export of the study."""

    estimator: str = MISSING  # "module:Class", e.g. sklearn.linear_model:Lasso
    args: dict[str, Any] = field(default_factory=dict)  # the class's keyword arguments


@dataclass
class Sweep:
    trials: int = 30  # trials a command runs
    validation_folds: int | None = None  # folds each trial trains and scores (default: all)
    jobs: int | None = None  # worker processes (default: one per core)
    pruning: bool = True
    # models of another kind the ensemble may draw on, by name (a CSV task scored by its fold models)
    estimators: dict[str, Estimator] = field(default_factory=dict)


@dataclass
class Submission:
    """The deliverable: one row per test row, in file order."""

    file: str = "submission.csv"
    id: str | None = None  # the id column's name (default: data.id; "id" for images)
    target: str | None = None  # the prediction column's name (default: data.target; "label" for images)
    probabilities: bool = False  # classification: one column of probabilities per class instead of labels
    id_range: list[int] | None = None  # [first, last]: the ids a competition expects, ascending


@dataclass
class Final:
    """How the test rows are predicted: the fold models' average (the models CV scored), or a refit
    on every training row of ``seeds`` members that differ only in their seeds."""

    refit: bool = False
    seeds: int = 1


@dataclass
class Preset:
    name: str = MISSING
    kind: str = "regression"  # regression | classification
    metric: str = "rmse"  # rmse | mae (regression); acc | logloss | auc (classification; auc: two classes)
    metric_scale: str = "transformed"  # regression: the metric on the transformed target, or "original"
    folds: int = 5
    stratified: bool | None = None  # stratified folds (default: for classification)
    # torch's deterministic algorithms: true (the same seed, the same scores), warn (a warning
    # where an op has no deterministic kernel, as some CUDA backward passes have not), false
    deterministic: Any = True
    # arithmetic chosen by timing, as torch.backends.cudnn.benchmark: how a model's folds train
    # (project/engine/layout.py) and cuDNN's kernels. Off, the same command and seed give the same
    # scores on any machine of a device type; on, the runs record what was chosen
    benchmark: bool = False
    # lightning.Trainer's keyword arguments for every fit, the folds' and the refit's (min_epochs,
    # log_every_n_steps, default_root_dir, ...); those the engine sets are refused, saying where they
    # are set instead (project/validate.py)
    trainer: dict[str, Any] = field(default_factory=dict)
    # Lightning callbacks and loggers, each {class: "module:Class", args: {...}}, made anew for every
    # fit: lightning.pytorch.callbacks:EarlyStopping, lightning.pytorch.loggers:CSVLogger, your own
    callbacks: list[dict[str, Any]] = field(default_factory=list)
    loggers: list[dict[str, Any]] = field(default_factory=list)
    # modules of your own imported before anything else (models and data kinds register themselves),
    # found beside this file, in the working directory or on PYTHONPATH; saved models carry them
    imports: list[str] = field(default_factory=list)
    data: Data = field(default_factory=Data)
    model: str = "mlp"  # the default model (a registered name, or module:Class); --model picks another
    models: dict[str, ModelPreset] = field(default_factory=dict)
    sweep: Sweep = field(default_factory=Sweep)
    submission: Submission = field(default_factory=Submission)
    final: Final = field(default_factory=Final)
    extends: str | None = None  # a preset (by name) this file is merged over
    source: str = ""  # the file it was read from (set when loaded)

    @property
    def direction(self) -> Direction:
        return "maximize" if HIGHER_IS_BETTER[self.metric] else "minimize"

    @property
    def is_stratified(self) -> bool:
        return self.kind == "classification" if self.stratified is None else self.stratified

    def model_preset(self, model: str | None = None) -> ModelPreset:
        return self.models[model or self.model]

    def resolved(self) -> dict:
        """The preset as plain values: what a study stores, MLflow logs and a worker rebuilds it from."""
        return dataclasses.asdict(self)


@dataclass
class TrainConfig:
    """One point of the search space: the model and everything that defines its fit, the data split
    excepted. ``model_kwargs`` are the registered model's own arguments (``project.models``); that
    the model exists and takes them is checked by ``project.validate.check_config``."""

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
    # images only: the augmentation of training images (Augment; default: the preset's data.augment)
    translate: int = 0
    flip: bool = False
    erase: float = 0.0
    tta_flip: bool = False  # images only: each prediction the average of the image's and its mirror image's
    gradient_clip_val: float | None = None  # each fold's gradient norm is clipped to this
    precision: Precision = "32-true"
    # convolution weights kept channels-last (NHWC): oneDNN's faster convolutions on a CPU under
    # bf16-mixed; the same arithmetic up to the order of sums (docs/results.md)
    channels_last: bool = False

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
            (0 <= self.erase < 1, "erase", "a probability in [0, 1)"),
            (self.gradient_clip_val is None or self.gradient_clip_val > 0, "gradient_clip_val", "a positive number"),
            (self.precision in PRECISIONS, "precision", f"one of {', '.join(PRECISIONS)}"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")

    @property
    def augment(self) -> Augment:
        return Augment(self.translate, self.flip, self.erase, self.tta_flip)

    def to_dict(self) -> dict:
        return asdict(self)

    def flat(self) -> dict:
        """One level of keys (``model_kwargs`` as ``model.<name>``), as MLflow parameters."""
        values = self.to_dict()
        kwargs = values.pop("model_kwargs")
        return {**values, **{f"model.{k}": v for k, v in kwargs.items()}}


def search_names(key: str, param: SearchParam) -> list[str]:
    """The Optuna parameters a search entry samples."""
    if param.depth is not None:
        return ["depth", "width"]
    return [param.name or key.removeprefix("model.")]
