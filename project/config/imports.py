"""Objects a configuration names as ``module:name``: a user's function, an estimator class."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from project.config.schema import PresetError


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


def instantiate(reference: str, args: dict) -> Any:
    """A fresh object: the class ``reference`` (``module:Class``) names, called with ``args``."""
    return imported(reference)(**args)
