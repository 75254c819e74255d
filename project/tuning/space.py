"""The search space: learning rate, weight decay and schedule, batch size and epochs, and each
model's own arguments (the MLP's width, depth and dropout; the CNN's channels and dropout)."""

from __future__ import annotations

from collections.abc import Callable

import optuna

from project.tasks import Task, TrainConfig

# per (kind of task, model): the ranges the defaults search; every one of them can be fixed by a flag
SPACES = {
    ("regression", "mlp"): {
        "lr": (1e-4, 3e-2), "weight_decay": (1e-6, 1.0), "dropout": (0.0, 0.5),
        "depth": (0, 2), "width": (32, 512), "batch_size": (32, 64, 128), "max_epochs": (40, 160),
    },
    ("classification", "mlp"): {
        "lr": (3e-4, 3e-3), "weight_decay": (1e-5, 1e-1), "dropout": (0.1, 0.5), "input_dropout": (0.0, 0.3),
        "depth": (1, 3), "width": (512, 1024), "batch_size": (128, 256), "max_epochs": (16, 28),
    },
    ("classification", "cnn"): {
        "lr": (1e-3, 1e-2), "weight_decay": (1e-5, 1e-2), "dropout": (0.1, 0.5), "channels": (16, 48),
        "batch_size": (128, 256), "max_epochs": (8, 16),
    },
}

# the first trial of a new study: configurations that measured well on validation folds only
# (README), so the search starts from a good region
START_POINTS = {
    ("regression", "mlp"): {"lr": 0.01, "weight_decay": 0.05, "depth": 0, "scheduler": "cosine", "optimizer": "sgd",
                            "batch_size": 128, "max_epochs": 100},
    ("classification", "mlp"): {"input_dropout": 0.1, "lr": 1e-3, "weight_decay": 1e-2, "depth": 2, "width": 1024,
                                "dropout": 0.3, "batch_size": 256, "max_epochs": 20},
    ("classification", "cnn"): {"lr": 3e-3, "weight_decay": 1e-4, "dropout": 0.25, "channels": 32,
                                "batch_size": 128, "max_epochs": 12},
}
# which flag fixes which searched parameters
_FIXED_BY = {"hidden_sizes": ("depth", "width", "dropout", "linear_skip")}


def space_of(task: Task, model: str) -> dict:
    if (task.kind, model) not in SPACES:
        models = sorted(m for kind, m in SPACES if kind == task.kind)
        raise ValueError(f"no search space for model {model!r} on {task.kind} task {task.name!r}: "
                         f"expected one of {', '.join(models)}")
    return SPACES[task.kind, model]


def start_point(task: Task, model: str, fixed: dict) -> dict:
    """The start point of the task and model, without the parameters the command line fixes."""
    dropped = {p for flag in fixed for p in _FIXED_BY.get(flag, (flag,))}
    return {k: v for k, v in START_POINTS[task.kind, model].items() if k not in dropped}


def _mlp_kwargs(trial: optuna.Trial, task: Task, space: dict, fixed: dict) -> dict:
    kwargs = {}
    if task.kind == "classification":
        kwargs["input_dropout"] = trial.suggest_float("input_dropout", *space["input_dropout"])
    if "hidden_sizes" in fixed:
        kwargs["hidden_sizes"] = fixed["hidden_sizes"]
    else:
        depth = trial.suggest_int("depth", *space["depth"])
        width = trial.suggest_int("width", *space["width"], log=True) if depth else 0
        kwargs["hidden_sizes"] = (width,) * depth
    # dropout acts between hidden layers: a linear model has none to search
    kwargs["dropout"] = fixed.get("dropout", 0.0)
    if kwargs["hidden_sizes"] and "dropout" not in fixed:
        kwargs["dropout"] = trial.suggest_float("dropout", *space["dropout"])
    if task.kind == "regression" and kwargs["hidden_sizes"]:
        # a linear path beside the hidden layers lets an MLP start from the linear model
        kwargs["linear_skip"] = trial.suggest_categorical("linear_skip", [False, True])
    return kwargs


def _cnn_kwargs(trial: optuna.Trial, task: Task, space: dict, fixed: dict) -> dict:
    base = trial.suggest_int("channels", *space["channels"], step=8)
    dropout = fixed["dropout"] if "dropout" in fixed else trial.suggest_float("dropout", *space["dropout"])
    return {"channels": (base, 2 * base), "dropout": dropout}


MODEL_KWARGS: dict[str, Callable[[optuna.Trial, Task, dict, dict], dict]] = {"mlp": _mlp_kwargs, "cnn": _cnn_kwargs}


def suggest_config(trial: optuna.Trial, task: Task, model: str, fixed: dict) -> TrainConfig:
    """Sample a configuration; values in ``fixed`` are used as they are and not searched."""
    space = space_of(task, model)
    values = task.config(model).to_dict()
    if task.kind == "classification":
        # a one-cycle schedule and label smoothing: the settings the best public image nets train with
        values.update(scheduler="onecycle", label_smoothing=0.1)
    values["model_kwargs"] = {**values["model_kwargs"], **MODEL_KWARGS[model](trial, task, space, fixed)}
    values["lr"] = fixed.get("lr") or trial.suggest_float("lr", *space["lr"], log=True)
    values["weight_decay"] = fixed["weight_decay"] if "weight_decay" in fixed else trial.suggest_float(
        "weight_decay", *space["weight_decay"], log=True)
    if task.kind == "regression":
        # on House Prices a cosine decay lets the near-linear models settle, and SGD with momentum
        # and weight decay settles where ridge regression does, which suits the linear model best
        values["scheduler"] = trial.suggest_categorical("scheduler", ["none", "cosine"])
        values["optimizer"] = trial.suggest_categorical("optimizer", ["adamw", "sgd"])
    values["batch_size"] = fixed.get("batch_size") or trial.suggest_categorical("batch_size", space["batch_size"])
    values["max_epochs"] = fixed.get("max_epochs") or trial.suggest_int("max_epochs", *space["max_epochs"], step=4)
    return TrainConfig(**values)


def config_from_params(task: Task, model: str, params: dict, fixed: dict) -> TrainConfig:
    """Rebuild a trial's configuration from its stored parameters."""
    return suggest_config(optuna.trial.FixedTrial(params), task, model, fixed)
