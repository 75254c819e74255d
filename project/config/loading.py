"""Reading a preset: YAML files merged over the presets they ``extend``, then ``--set`` overrides
and flags, into the schema's dataclasses. What the values must name is checked by
``project.validate``, whose ``load_preset`` the entry points call."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from project.config.imports import import_modules
from project.config.schema import Preset, PresetError
from project.utils.paths import REPO_ROOT

PRESET_DIR = REPO_ROOT / "experiments" / "configs"


def available() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(f"no preset {name!r}: expected {path}; the presets are {', '.join(available()) or 'none'}")
    return path


def read(path: str | Path, overrides: Sequence[str] = (), values: dict | None = None) -> Preset:
    """Read and merge a preset (its values unchecked): ``overrides`` are ``key=value`` strings (``--set``), ``values``
    a nested dict of settings from flags; both win over the file."""
    path = Path(path)
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(Preset), *_layers(path), OmegaConf.from_dotlist(list(overrides)), values or {}
        )
        preset = cast(Preset, OmegaConf.to_object(merged))
    except OmegaConfBaseException as err:
        key = f"key {err.full_key!r}: " if getattr(err, "full_key", None) else ""
        raise PresetError(f"{path}: {key}{str(err).splitlines()[0]}") from None
    preset.source = str(path)
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
    parent = text.get("extends") if isinstance(text, DictConfig) else None
    return [*(_layers(preset_path(parent), (*seen, path)) if parent else []), text]


def from_resolved(values: dict) -> Preset:
    """The preset ``Preset.resolved()`` gave (no file, no checks again), its ``imports`` imported."""
    preset = cast(Preset, OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Preset), OmegaConf.create(values))))
    import_modules(preset)
    return preset


def to_yaml(values: dict) -> str:
    """A resolved preset as YAML, as a study's MLflow run keeps it."""
    return OmegaConf.to_yaml(OmegaConf.create(values))
