"""The search space a preset declares (``models.<model>.search``), sampled by an Optuna trial.

Each entry names a training setting (``lr``) or a model argument (``model.dropout``) and how to
sample it; entries are sampled in the file's order, and one with ``when`` only where the setting
it names is set, and not ``none`` (dropout only beside hidden layers, an embedding's scale only
beside an embedding). A setting fixed on the command line is used as it is and not searched.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import BaseTrial

from project.config import SearchParam, TrainConfig, search_names
from project.tasks import Task
from project.validate import check_config


def sample(trial: BaseTrial, key: str, param: SearchParam) -> Any:
    """One value of a search entry."""
    name = search_names(key, param)[0]
    if param.choices is not None:
        return trial.suggest_categorical(name, list(param.choices))
    if param.depth is not None:
        depth = trial.suggest_int("depth", *param.depth)
        if param.width is None:
            raise ValueError(f"search entry {key!r}: depth needs a width range beside it")
        width = trial.suggest_int("width", *param.width, log=True) if depth else 0
        return (width,) * depth
    if isinstance(param.low, int) and isinstance(param.high, int):
        value = trial.suggest_int(name, param.low, param.high, step=param.step or 1, log=param.log)
        return tuple(value * t for t in param.times) if param.times else value
    return trial.suggest_float(
        name, float(param.low), float(param.high), log=param.log, step=None if param.step is None else float(param.step)
    )


def start_point(task: Task, model: str, fixed: dict) -> dict:
    """The preset's first trial for ``model``, without the parameters the command line fixes or
    that are searched only beside one it fixes (dropout beside fixed hidden layers)."""
    search = task.preset.model_preset(model).search
    dropped = {
        n for key, param in search.items() if key in fixed or param.when in fixed for n in search_names(key, param)
    }
    return {k: v for k, v in task.preset.model_preset(model).start.items() if k not in dropped}


def suggest_config(trial: BaseTrial, task: Task, model: str, fixed: dict) -> TrainConfig:
    """Sample a configuration: the preset's settings for ``model``, its search entries sampled
    in order, and ``fixed`` (search keys, e.g. ``lr`` or ``model.dropout``) as they are."""
    values = task.config(model).to_dict()
    chosen: dict[str, Any] = {}
    for key, param in task.preset.model_preset(model).search.items():
        if key in fixed:
            chosen[key] = fixed[key]
        elif param.when is None or _is_set(values, chosen, param.when):
            chosen[key] = sample(trial, key, param)
    for key, value in {**fixed, **chosen}.items():
        if key.startswith("model."):
            values["model_kwargs"][key.removeprefix("model.")] = value
        else:
            values[key] = value
    return check_config(TrainConfig(**values))


def _is_set(values: dict, chosen: dict, key: str) -> bool:
    """Whether the setting ``key`` is set: true, nonzero, nonempty, and not ``none``."""
    if key in chosen:
        value = chosen[key]
    elif key.startswith("model."):
        value = values["model_kwargs"].get(key.removeprefix("model."))
    else:
        value = values.get(key)
    return bool(value) and value != "none"


def config_from_params(task: Task, model: str, params: dict, fixed: dict) -> TrainConfig:
    """Rebuild a trial's configuration from its stored parameters."""
    return suggest_config(optuna.trial.FixedTrial(params), task, model, fixed)
