"""Every configuration's schema and how it is read: the preset and the training configuration."""

from project.config.imports import derive_function, imported, instantiate
from project.config.loading import PRESET_DIR, available, from_resolved, preset_path, read, to_yaml
from project.config.schema import (
    HIGHER_IS_BETTER,
    Augment,
    ModelPreset,
    PreprocessOptions,
    Preset,
    PresetError,
    SearchParam,
    TrainConfig,
    search_names,
)

__all__ = [
    "HIGHER_IS_BETTER",
    "PRESET_DIR",
    "Augment",
    "ModelPreset",
    "PreprocessOptions",
    "Preset",
    "PresetError",
    "SearchParam",
    "TrainConfig",
    "available",
    "derive_function",
    "from_resolved",
    "imported",
    "instantiate",
    "preset_path",
    "read",
    "search_names",
    "to_yaml",
]
