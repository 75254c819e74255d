"""Data sources, DataModules (one per kind of data, registered by name) and per-fold preprocessing."""

from project.data.base import FoldDataModule, Members, kfold_indices
from project.data.errors import DataError
from project.data.images import IdxDataModule, ImageDataModule, ImageFolderDataModule
from project.data.kinds import DATA_KINDS, data_kind, register_data_kind
from project.data.sources import fetch_dataset
from project.data.tables import TARGET_TRANSFORMS, TableDataModule
from project.data.tabular import PreprocessOptions, TabularSpec

__all__ = [
    "DATA_KINDS",
    "TARGET_TRANSFORMS",
    "DataError",
    "FoldDataModule",
    "IdxDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "Members",
    "PreprocessOptions",
    "TableDataModule",
    "TabularSpec",
    "data_kind",
    "fetch_dataset",
    "kfold_indices",
    "register_data_kind",
]
