"""Models chosen by name: ``@register_model("cnn")`` on an ``nn.Module`` class, then
``create_model("cnn", in_shape, out_features, **kwargs)``.

A registered model is an ordinary batch-first module, ``[B, *in_shape] -> [B, out_features]``,
that knows nothing of folds; its constructor takes ``in_shape`` and ``out_features`` and then its
own keyword arguments, which are what a configuration, a search space and a saved model record.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from project.config.imports import imported

MODELS: dict[str, type[nn.Module]] = {}


def register_model(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"model {name!r} is registered already, by {MODELS[name].__qualname__}")
        MODELS[name] = cls
        return cls

    return register


def model_class(name: str) -> type[nn.Module]:
    """The registered class, or for a ``module:Class`` name the class it imports (registered then)."""
    if name not in MODELS and ":" in name:
        try:
            register_model(name)(imported(name))
        except ImportError:
            raise ValueError(f"model {name!r} is not importable: expected module:Class of an nn.Module") from None
    if name not in MODELS:
        raise ValueError(
            f"model {name!r} is unknown: expected one of {', '.join(sorted(MODELS))}, or module:Class "
            "(a model of your own: its module under the preset's imports registers it)"
        )
    return MODELS[name]


def model_arguments(name: str) -> dict[str, inspect.Parameter]:
    """The keyword arguments a model takes beyond ``in_shape`` and ``out_features``."""
    parameters = inspect.signature(model_class(name)).parameters
    return {k: p for k, p in parameters.items() if k not in ("self", "in_shape", "out_features")}


def check_model_kwargs(name: str, kwargs: dict) -> None:
    """Refuse keyword arguments the model does not take, naming them and the ones it does."""
    accepted = model_arguments(name)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} takes no argument {', '.join(map(repr, unknown))}: "
            f"expected some of {', '.join(accepted) or 'none'}"
        )


def create_model(name: str, in_shape: tuple[int, ...], out_features: int, **kwargs) -> nn.Module:
    check_model_kwargs(name, kwargs)
    return model_class(name)(in_shape=tuple(in_shape), out_features=out_features, **kwargs)
