"""Presets: one YAML file says what a task is, from its data to its sweep and submission.

``experiments/configs/<name>.yaml`` is the preset ``--task <name>`` loads; ``--config PATH``
loads any other file. The schema is the dataclasses below, enforced by OmegaConf: an unknown key,
a value of the wrong type, an unknown model, metric or transform, a search entry that names no
setting, or a data file or column that is not there is refused before any work, naming the file,
the key and what was expected. ``Preset.resolved()`` is the plain-dict form a study stores and
MLflow logs, and what spawned workers rebuild the task from.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from project.data.tabular import SCALERS, PreprocessOptions
from project.utils.paths import REPO_ROOT

PRESET_DIR = REPO_ROOT / "experiments" / "configs"
KINDS = ("regression", "classification")
METRICS = {"regression": ("rmse", "mae"), "classification": ("acc", "logloss", "auc")}
HIGHER_IS_BETTER = {"rmse": False, "mae": False, "acc": True, "logloss": False, "auc": True}
TRANSFORMS = ("none", "log", "log1p")
DATA_KINDS = ("csv", "idx", "image-folder")
DETERMINISTIC = (True, False, "warn")


class PresetError(ValueError):
    """A preset that cannot be used; the message names the file, the key and what was expected."""


@dataclass
class Data:
    kind: str = "csv"  # csv | idx | image-folder
    dataset: str = MISSING  # the folder under --data-dir (and its pinned checksums in data/checksums.json, if any)
    train: Optional[str] = None  # csv: the training file (train.csv); image-folder: its folder (train/<class>/...)
    test: Optional[str] = None  # csv: the test file (test.csv); image-folder: test/<class>/... or test/... unlabelled
    id: Optional[str] = None  # csv: the row id column
    target: Optional[str] = None  # csv: the target column
    target_transform: str = "none"  # regression: none | log | log1p; the model learns the transformed target
    # how to read other columns, where the file has them:
    numeric: Optional[list[str]] = None  # columns that must hold numbers (default: whatever reads as numbers)
    categorical: list[str] = field(default_factory=list)  # columns read as categories even when they hold numbers
    ordinal: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> level -> number
    derive: Optional[str] = None  # "module:function" adding row-wise features to a DataFrame
    drop_train_rows: Optional[str] = None  # a pandas query: training-part rows to leave out (never validation rows)
    preprocess: PreprocessOptions = field(default_factory=PreprocessOptions)
    image_size: Optional[list[int]] = None  # image-folder: [height, width] to resize to (default: the images' own)


@dataclass
class SearchParam:
    """One searched setting: a range (``low``/``high``, ``log``, ``step``), ``choices``, hidden layers
    (``depth`` and ``width`` ranges, giving ``(width,) * depth``) or a sampled integer times each of
    ``times`` (channels ``(c, 2c)``); ``when`` names an earlier setting it is searched only beside."""

    low: Any = None  # integers sample integers, decimals floats, as written
    high: Any = None
    log: bool = False
    step: Any = None
    choices: Optional[list[Any]] = None
    depth: Optional[list[int]] = None
    width: Optional[list[int]] = None
    times: Optional[list[int]] = None
    when: Optional[str] = None
    name: Optional[str] = None  # the Optuna parameter (default: the setting without its "model." prefix)


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
    validation_folds: Optional[int] = None  # folds each trial trains and scores (default: all)
    jobs: Optional[int] = None  # worker processes (default: one per core)
    pruning: bool = True
    # models of another kind the ensemble may draw on, by name (a CSV task scored by its fold models)
    estimators: dict[str, Estimator] = field(default_factory=dict)


@dataclass
class Submission:
    """The deliverable: one row per test row, in file order."""

    file: str = "submission.csv"
    id: Optional[str] = None  # the id column's name (default: data.id; "id" for images)
    target: Optional[str] = None  # the prediction column's name (default: data.target; "label" for images)
    probabilities: bool = False  # classification: one column of probabilities per class instead of labels
    id_range: Optional[list[int]] = None  # [first, last]: the ids a competition expects, ascending


@dataclass
class Final:
    """How the test rows are predicted: the fold models' average (the models CV scored), or a refit
    on every training row of ``ensemble`` members that differ only in their seeds."""

    refit: bool = False
    ensemble: int = 1


@dataclass
class Preset:
    name: str = MISSING
    kind: str = "regression"  # regression | classification
    metric: str = "rmse"  # rmse | mae (regression); acc | logloss | auc (classification; auc: two classes)
    metric_scale: str = "transformed"  # regression: the metric on the transformed target, or "original"
    folds: int = 5
    stratified: Optional[bool] = None  # stratified folds (default: for classification)
    # torch's deterministic algorithms: true (the same seed, the same scores), warn (a warning
    # where an op has no deterministic kernel, as some CUDA backward passes have not), false
    deterministic: Any = True
    data: Data = field(default_factory=Data)
    model: str = "mlp"  # the default model; --model picks another of `models`
    models: dict[str, ModelPreset] = field(default_factory=dict)
    sweep: Sweep = field(default_factory=Sweep)
    submission: Submission = field(default_factory=Submission)
    final: Final = field(default_factory=Final)
    extends: Optional[str] = None  # a preset (by name) this file is merged over
    source: str = ""  # the file it was read from (set when loaded)

    @property
    def direction(self) -> str:
        return "maximize" if HIGHER_IS_BETTER[self.metric] else "minimize"

    @property
    def is_stratified(self) -> bool:
        return self.kind == "classification" if self.stratified is None else self.stratified

    def model_preset(self, model: str | None = None) -> ModelPreset:
        return self.models[model or self.model]

    def resolved(self) -> dict:
        """The preset as plain values: what a study stores, MLflow logs and a worker rebuilds it from."""
        return dataclasses.asdict(self)


def available() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"no preset {name!r}: expected {path}; the presets are {', '.join(available()) or 'none'}")
    return path


def load(path: str | Path, overrides: Sequence[str] = (), values: dict | None = None) -> Preset:
    """Read, merge and check a preset: ``overrides`` are ``key=value`` strings (``--set``), ``values``
    a nested dict of settings from flags; both win over the file."""
    path = Path(path)
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Preset), *_layers(path), OmegaConf.from_dotlist(list(overrides)), values or {}
        )
        preset = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = f"key {err.full_key!r}: " if getattr(err, "full_key", None) else ""
        raise PresetError(f"{path}: {key}{str(err).splitlines()[0]}") from None
    preset.source = str(path)
    check(preset, path)
    return preset


def _layers(path: Path, seen: tuple[Path, ...] = ()) -> list:
    """The file's YAML, after that of the presets it ``extends``."""
    if path in seen:
        raise PresetError(f"{path}: key 'extends': the presets extend one another in a circle")
    try:
        text = OmegaConf.load(path)
    except FileNotFoundError:
        raise PresetError(f"{path}: file not found") from None
    except Exception as err:  # noqa: BLE001 - the YAML parser's own error types
        raise PresetError(f"{path}: not a readable YAML preset: {str(err).splitlines()[0]}") from None
    parent = text.get("extends") if hasattr(text, "get") else None
    return [*(_layers(preset_path(parent), (*seen, path)) if parent else []), text]


def from_resolved(values: dict) -> Preset:
    """The preset ``Preset.resolved()`` gave (no file, no checks again)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Preset), OmegaConf.create(values)))


def _one_of(path: Path, key: str, value: Any, allowed: Sequence) -> None:
    if value not in allowed:
        raise PresetError(
            f"{path}: key {key!r}: {value!r} is not allowed; expected one of {', '.join(map(str, allowed))}"
        )


def check(preset: Preset, path: Path) -> None:
    """What OmegaConf's types do not say: allowed values, and settings that must name real things."""
    from project.models.registry import check_model_kwargs, model_arguments
    from project.tasks import TrainConfig

    _one_of(path, "kind", preset.kind, KINDS)
    _one_of(path, "metric", preset.metric, METRICS[preset.kind])
    _one_of(path, "metric_scale", preset.metric_scale, ("transformed", "original"))
    _one_of(path, "data.kind", preset.data.kind, DATA_KINDS)
    _one_of(path, "data.target_transform", preset.data.target_transform, TRANSFORMS)
    _one_of(path, "data.preprocess.scaler", preset.data.preprocess.scaler, SCALERS)
    if preset.kind == "classification" and preset.data.target_transform != "none":
        raise PresetError(
            f"{path}: key 'data.target_transform': {preset.data.target_transform!r} is for regression; "
            "expected 'none' for a classification task"
        )
    if preset.deterministic not in DETERMINISTIC:
        raise PresetError(f"{path}: key 'deterministic': {preset.deterministic!r}, expected true, warn or false")
    if preset.folds < 2:
        raise PresetError(f"{path}: key 'folds': {preset.folds}, expected at least 2 (K-fold needs two folds)")
    if preset.data.kind == "csv":
        for key in ("id", "target"):
            if not getattr(preset.data, key):
                raise PresetError(f"{path}: key 'data.{key}': missing; a CSV task names its {key} column")
    if preset.data.derive:
        derive_function(preset.data.derive, path)
    if preset.model not in preset.models:
        raise PresetError(
            f"{path}: key 'model': {preset.model!r} has no entry under 'models'; "
            f"expected one of {', '.join(preset.models) or '(none)'}"
        )
    for name, model in preset.models.items():
        where = f"models.{name}"
        try:
            check_model_kwargs(name, model.args)
            TrainConfig(**{**model.train, "model": name, "model_kwargs": model.args})
        except (TypeError, ValueError) as err:
            raise PresetError(f"{path}: key {where!r}: {err}") from None
        settings = {f.name for f in dataclasses.fields(TrainConfig)} - {"model", "model_kwargs"}
        arguments = set(model_arguments(name))
        names = set()
        for key, param in model.search.items():
            target, _, argument = key.partition(".")
            known = argument in arguments if target == "model" else key in settings
            if not known:
                raise PresetError(
                    f"{path}: key '{where}.search.{key}': names no setting; expected a training setting "
                    f"({', '.join(sorted(settings))}) or model.<argument> ({', '.join(sorted(arguments))})"
                )
            if sum(x is not None for x in (param.low, param.choices, param.depth)) != 1:
                raise PresetError(
                    f"{path}: key '{where}.search.{key}': expected one of low/high, choices, or depth/width"
                )
            if (
                param.when is not None
                and param.when not in model.search
                and param.when not in ("model." + a for a in arguments)
            ):
                raise PresetError(f"{path}: key '{where}.search.{key}.when': {param.when!r} is not a searched setting")
            names.update(search_names(key, param))
        unknown = sorted(set(model.start) - names)
        if unknown:
            raise PresetError(
                f"{path}: key '{where}.start': {', '.join(unknown)} are not searched; expected some of "
                f"{', '.join(sorted(names))}"
            )
    check_estimators(preset, path)


def check_estimators(preset: Preset, path: Path) -> None:
    """Each of ``sweep.estimators`` names a class that takes its arguments and predicts what the
    task needs, on a task whose test rows its fold models predict (a refit has no folds to fit on)."""
    from project.estimators import build_estimator

    if preset.sweep.estimators and (preset.data.kind != "csv" or preset.final.refit):
        raise PresetError(
            f"{path}: key 'sweep.estimators': estimators join the ensemble of a CSV task whose fold "
            "models predict its test rows; expected none for this task (data.kind "
            f"{preset.data.kind!r}, final.refit {preset.final.refit})"
        )
    method = "predict" if preset.kind == "regression" else "predict_proba"
    for name, spec in preset.sweep.estimators.items():
        where = f"sweep.estimators.{name}"
        try:
            estimator = build_estimator(spec.estimator, spec.args)
        except ImportError:
            raise PresetError(
                f"{path}: key '{where}.estimator': {spec.estimator!r} is not importable; expected "
                "'module:Class', e.g. 'sklearn.linear_model:Lasso'"
            ) from None
        except (TypeError, ValueError) as err:
            raise PresetError(f"{path}: key '{where}.args': {err}") from None
        if not (hasattr(estimator, "fit") and hasattr(estimator, method)):
            raise PresetError(
                f"{path}: key '{where}.estimator': {spec.estimator!r} has no fit and {method} "
                f"methods; expected a scikit-learn {preset.kind} estimator"
            )


def check_data(preset: Preset, data_dir: str | Path) -> None:
    """The data files the preset names are there, with the columns it names (only headers are
    read). A data set with pinned sources (data/checksums.json) may be missing: it is fetched."""
    import pandas as pd

    from project.data.sources import DATASETS

    data, source = preset.data, preset.source
    folder = Path(data_dir) / data.dataset
    if data.kind != "csv":
        if data.dataset not in DATASETS and not folder.is_dir():
            raise PresetError(f"{source}: key 'data.dataset': {folder} is not a folder; expected the data set there")
        return
    for key, default in (("train", "train.csv"), ("test", "test.csv")):
        path = folder / (getattr(data, key) or default)
        if not path.is_file():
            if data.dataset in DATASETS:
                continue  # fetched from its sources before it is read
            raise PresetError(f"{source}: key 'data.{key}': {path} not found; expected the {key} file there")
        try:
            header = list(pd.read_csv(path, nrows=0).columns)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue  # reading the data itself names what is wrong with the file
        for name in ("id", "target") if key == "train" else ("id",):
            column = getattr(data, name)
            if column not in header:
                raise PresetError(
                    f"{source}: key 'data.{name}': {path} has no column {column!r}; "
                    f"its header has {len(header)} columns"
                )


def search_names(key: str, param: SearchParam) -> list[str]:
    """The Optuna parameters a search entry samples."""
    if param.depth is not None:
        return ["depth", "width"]
    return [param.name or key.removeprefix("model.")]


def derive_function(reference: str | None, source: str | Path):
    """The ``module:function`` a preset's ``data.derive`` names (None where it names none)."""
    if not reference:
        return None
    try:
        return imported(reference)
    except ImportError:
        raise PresetError(
            f"{source}: key 'data.derive': {reference!r} is not importable; expected 'module:function'"
        ) from None


def imported(reference: str):
    """The object ``module:name`` names (ImportError where it names none)."""
    module, _, name = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (AttributeError, ValueError):
        raise ImportError(reference) from None


def to_yaml(values: dict) -> str:
    """A resolved preset as YAML, as a study's MLflow run keeps it."""
    return OmegaConf.to_yaml(OmegaConf.create(values))
