"""The one place a configuration is checked against the rest of the project: the models it names
and their arguments, its search space, its estimators, its data files and columns. A preset that
fails is refused before any work, naming the file, the key and what was expected."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger

from project.config import PresetError, TrainConfig, instantiate, read, search_names
from project.config.imports import derive_function, import_modules, imported
from project.config.schema import DETERMINISTIC, KINDS, METRICS, TRANSFORMS, Preset
from project.data import DATA_KINDS, data_kind
from project.data.tabular import SCALERS
from project.models.registry import check_model_kwargs, model_arguments, model_class


def load_preset(
    path: str | Path, overrides: Sequence[str] = (), values: dict | None = None, imports: Sequence[str] = ()
) -> Preset:
    """Read, merge and check a preset: ``overrides`` are ``key=value`` strings (``--set``), ``values``
    a nested dict of settings from flags; both win over the file. ``imports`` (``--import``) are
    imported after the preset's own, before anything is checked against the registries."""
    preset = read(path, overrides, values)
    preset.imports = [*preset.imports, *(name for name in imports if name not in preset.imports)]
    import_modules(preset)
    check_preset(preset, Path(path))
    return preset


def check_config(config: TrainConfig) -> TrainConfig:
    """The configuration's model is registered and takes its ``model_kwargs`` (ValueError if not)."""
    model_class(config.model)
    check_model_kwargs(config.model, config.model_kwargs)
    return config


def _one_of(path: Path, key: str, value: Any, allowed: Sequence) -> None:
    if value not in allowed:
        raise PresetError(
            f"{path}: key {key!r}: {value!r} is not allowed; expected one of {', '.join(map(str, allowed))}"
        )


def check_preset(preset: Preset, path: Path) -> None:
    """What OmegaConf's types do not say: allowed values, and settings that must name real things."""
    _one_of(path, "kind", preset.kind, KINDS)
    _one_of(path, "metric", preset.metric, METRICS[preset.kind])
    _one_of(path, "metric_scale", preset.metric_scale, ("transformed", "original"))
    _one_of(path, "data.kind", preset.data.kind, sorted(DATA_KINDS))
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
    data_kind(preset.data.kind).check_preset(preset, path)
    check_augment(preset, path)
    check_lightning(preset, path)
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
            check_config(TrainConfig(**{**model.train, "model": name, "model_kwargs": model.args}))
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


# Trainer arguments the engine sets for every fit, and where each is set instead
ENGINE_TRAINER_KEYS = {
    "max_epochs": "the training configuration's max_epochs (models.<model>.train.max_epochs, --max-epochs, "
    "or the sweep's search)",
    "precision": "the training configuration's precision (models.<model>.train.precision)",
    "gradient_clip_val": "the training configuration's gradient_clip_val, which clips each fold's gradients alone",
    "gradient_clip_algorithm": "the training configuration's gradient_clip_val, which clips each fold's gradient norm",
    "accumulate_grad_batches": "the engine steps its optimiser once per mini-batch itself; raise batch_size instead",
    "devices": "one device per fit: a fit's folds train as one stack on one device, and a sweep's workers "
    "share the GPUs (docs/gpu.md)",
    "num_nodes": "one device per fit: a sweep spreads over machines through its study's storage (docs/reliability.md)",
    "strategy": "one device per fit: the engine's fold stack is its parallelism",
    "accelerator": "the GPU where there is one, else the CPU (CUDA_VISIBLE_DEVICES= hides a GPU)",
    "deterministic": "the preset's deterministic key (or --deterministic)",
    "benchmark": "the preset's benchmark key (or --benchmark)",
    "callbacks": "the preset's callbacks list",
    "logger": "the preset's loggers list",
}


EXAMPLES = {"callbacks": "lightning.pytorch.callbacks:EarlyStopping", "loggers": "lightning.pytorch.loggers:CSVLogger"}


def check_lightning(preset: Preset, path: Path) -> None:
    """``trainer`` names arguments of lightning.Trainer the engine leaves to the user; ``callbacks``
    and ``loggers`` name Lightning classes their ``args`` fit, and a monitored metric is one the
    module logs, watched the way the task's metric improves."""
    accepted = inspect.signature(L.Trainer.__init__).parameters
    for key in preset.trainer:
        if key in ENGINE_TRAINER_KEYS:
            raise PresetError(
                f"{path}: key 'trainer.{key}': the engine sets it for every fit; use {ENGINE_TRAINER_KEYS[key]}"
            )
        if key not in accepted:
            raise PresetError(f"{path}: key 'trainer.{key}': not an argument of lightning.Trainer")
    for section, base in (("callbacks", L.Callback), ("loggers", Logger)):
        for i, entry in enumerate(getattr(preset, section)):
            where = f"{section}[{i}]"
            unknown = sorted(set(entry) - {"class", "args"})
            if unknown or not isinstance(entry.get("class"), str):
                raise PresetError(
                    f"{path}: key {where!r}: expected {{class: 'module:Class', args: {{...}}}}"
                    + (f", not {', '.join(unknown)}" if unknown else "")
                )
            try:
                cls = imported(entry["class"])
            except ImportError:
                raise PresetError(
                    f"{path}: key '{where}.class': {entry['class']!r} is not importable; expected 'module:Class', "
                    f"e.g. {EXAMPLES[section]}"
                ) from None
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PresetError(
                    f"{path}: key '{where}.class': {entry['class']!r} is not a {base.__module__}:{base.__name__}"
                )
            args = dict(entry.get("args") or {})
            try:
                inspect.signature(cls).bind(**args)
            except TypeError as err:
                raise PresetError(f"{path}: key '{where}.args': {err}") from None
            if "monitor" in args:
                _check_monitor(preset, path, where, args)


def _check_monitor(preset: Preset, path: Path, where: str, args: dict) -> None:
    """What a callback sees logged: ``train/loss`` and ``val/<metric>``, the mean over a fit's folds
    (a fit of K folds is one stack, stopped or saved as a whole; each fold's figures go to the
    loggers alone); a monitor of the task's metric watches it improve as the task does."""
    monitor, metric = str(args["monitor"]), f"val/{preset.metric}"
    if monitor not in ("train/loss", metric):
        per_fold = monitor.rpartition("/")[2].startswith(("fold_", "seed_"))
        raise PresetError(
            f"{path}: key '{where}.args.monitor': {monitor!r} is "
            + ("a fold's figure, which goes to the loggers alone" if per_fold else "not logged")
            + f"; expected train/loss or {metric} (the mean over a fit's folds, which train as one stack)"
        )
    best = "max" if monitor == metric and preset.direction == "maximize" else "min"
    if args.get("mode", "min") != best:
        raise PresetError(
            f"{path}: key '{where}.args.mode': {args.get('mode', 'min (the default)')!r} for {monitor}, which is "
            f"better {'higher' if best == 'max' else 'lower'}; expected mode: {best}"
        )


def check_augment(preset: Preset, path: Path) -> None:
    """``data.augment`` augments images: refused on a table, and each setting within its range."""
    augment = preset.data.augment
    if (augment or augment.tta_flip) and data_kind(preset.data.kind).tabular:
        raise PresetError(
            f"{path}: key 'data.augment': augments training images, and data.kind {preset.data.kind!r} holds "
            "table rows; expected none"
        )
    try:
        TrainConfig(**dataclasses.asdict(augment))
    except ValueError as err:
        raise PresetError(f"{path}: key 'data.augment': {err}") from None


def check_estimators(preset: Preset, path: Path) -> None:
    """Each of ``sweep.estimators`` names a class that takes its arguments and predicts what the
    task needs, on a task whose test rows its fold models predict (a refit has no folds to fit on)."""
    if preset.sweep.estimators and (not data_kind(preset.data.kind).tabular or preset.final.refit):
        raise PresetError(
            f"{path}: key 'sweep.estimators': estimators join the ensemble of a CSV task whose fold "
            "models predict its test rows; expected none for this task (data.kind "
            f"{preset.data.kind!r}, final.refit {preset.final.refit})"
        )
    method = "predict" if preset.kind == "regression" else "predict_proba"
    for name, spec in preset.sweep.estimators.items():
        where = f"sweep.estimators.{name}"
        try:
            estimator = instantiate(spec.estimator, spec.args)
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
    """The data the preset names is there (a table's columns too, from its header alone)."""
    data_kind(preset.data.kind).check_files(preset, Path(data_dir))
