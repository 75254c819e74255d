"""Data sources, DataModules and per-fold preprocessing."""

from project.data.base import FoldDataModule, Members, kfold_indices
from project.data.errors import DataError
from project.data.images import IdxDataModule, ImageDataModule, ImageFolderDataModule
from project.data.sources import fetch_dataset
from project.data.tables import TARGET_TRANSFORMS, TableDataModule
from project.data.tabular import PreprocessOptions, TabularSpec

__all__ = [
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
    "fetch_dataset",
    "kfold_indices",
]
