"""Code a configuration names: the modules of a preset's ``imports``, and objects named as
``module:name`` (a user's function, an estimator class, a model)."""

from __future__ import annotations

import importlib
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from project.config.schema import Preset, PresetError

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def import_modules(preset: Preset) -> None:
    """Import the preset's ``imports``, each found beside the preset file, in the working directory
    or on PYTHONPATH; a module that cannot be imported is a ``PresetError`` naming it."""
    folders = [Path(preset.source).resolve().parent] if preset.source else []
    for folder in map(str, [*folders, Path.cwd()]):
        if folder not in sys.path:
            sys.path.append(folder)
    for name in preset.imports:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - a user's module may raise anything as it is imported
            raise PresetError(
                f"{preset.source}: key 'imports': cannot import {name!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); expected a module beside the preset, in the "
                "working directory or on PYTHONPATH"
            ) from None


def own_code(preset: Preset) -> list[Path]:
    """The files of the user's modules the preset needs (its ``imports``, its ``derive`` function's
    and ``module:Class`` models' modules): what a saved model carries to run elsewhere. A package
    is its folder; modules of this project, the standard library and installed packages are not."""
    names = [*preset.imports, *(r.partition(":")[0] for r in _references(preset))]
    installed = {Path(p).resolve() for p in (sysconfig.get_paths()[k] for k in ("stdlib", "purelib", "platlib"))}
    found: list[Path] = []
    for name in dict.fromkeys(n.partition(".")[0] for n in names if n):
        module = sys.modules.get(name) or importlib.import_module(name)
        file = getattr(module, "__file__", None)
        if file is None:
            continue
        path = Path(file).resolve()
        path = path.parent if path.name == "__init__.py" else path
        if not any(path.is_relative_to(p) for p in (PACKAGE_DIR, *installed)):
            found.append(path)
    return found


def _references(preset: Preset) -> Iterable[str]:
    if preset.data.derive:
        yield preset.data.derive
    yield from (name for name in (preset.model, *preset.models) if ":" in name)


def add_to_path(folder: Path) -> None:
    """Make the modules in ``folder`` (a saved model's own code) importable, before any other copy."""
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


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
