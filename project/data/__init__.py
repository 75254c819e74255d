"""Data sources, DataModules and per-fold preprocessing."""

from project.data.base import FoldDataModule, kfold_indices
from project.data.house_prices import HousePricesDataModule
from project.data.images import FashionMNISTDataModule, MNISTDataModule
from project.data.sources import DataError, fetch_dataset
from project.data.tabular import PreprocessOptions, TabularSpec

__all__ = [
    "DataError",
    "FashionMNISTDataModule",
    "FoldDataModule",
    "HousePricesDataModule",
    "MNISTDataModule",
    "PreprocessOptions",
    "TabularSpec",
    "fetch_dataset",
    "kfold_indices",
]
