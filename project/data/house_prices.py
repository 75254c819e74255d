"""Kaggle House Prices: train.csv / test.csv, target log(SalePrice), per-fold preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from project.data.base import FoldDataModule
from project.data.batches import MemberFeatures
from project.data.tabular import (
    FoldPreprocessor,
    PreprocessOptions,
    TabularSpec,
    check_same_columns,
    read_csv,
    stack_members,
)

QUALITY = {"Po": 1.0, "Fa": 2.0, "TA": 3.0, "Gd": 4.0, "Ex": 5.0}
QUALITY_COLUMNS = ("ExterQual", "ExterCond", "BsmtQual", "BsmtCond", "HeatingQC", "KitchenQual",
                   "FireplaceQu", "GarageQual", "GarageCond", "PoolQC")


def derive_house_features(df: pd.DataFrame) -> pd.DataFrame:
    """Row-wise totals and ages, the features the strongest public solutions add (a column that is
    absent counts as zero)."""
    df = df.copy()

    def zero(column: str) -> pd.Series | float:
        # a missing area or count here means there is none
        return df[column].fillna(0.0) if column in df else 0.0

    df["TotalSF"] = zero("TotalBsmtSF") + zero("1stFlrSF") + zero("2ndFlrSF")
    df["TotalBath"] = zero("FullBath") + 0.5 * zero("HalfBath") + zero("BsmtFullBath") + 0.5 * zero("BsmtHalfBath")
    df["TotalPorchSF"] = sum(zero(c) for c in ("OpenPorchSF", "EnclosedPorch", "3SsnPorch", "ScreenPorch", "WoodDeckSF"))
    df["HouseAge"] = zero("YrSold") - zero("YearBuilt")
    df["RemodAge"] = zero("YrSold") - zero("YearRemodAdd")
    df["QualSF"] = zero("OverallQual") * zero("GrLivArea")
    return df


# the columns of train.csv that hold numbers (a text value in one of them is an error)
NUMERIC_COLUMNS = (
    "Id", "MSSubClass", "LotFrontage", "LotArea", "OverallQual", "OverallCond", "YearBuilt", "YearRemodAdd",
    "MasVnrArea", "BsmtFinSF1", "BsmtFinSF2", "BsmtUnfSF", "TotalBsmtSF", "1stFlrSF", "2ndFlrSF", "LowQualFinSF",
    "GrLivArea", "BsmtFullBath", "BsmtHalfBath", "FullBath", "HalfBath", "BedroomAbvGr", "KitchenAbvGr",
    "TotRmsAbvGrd", "Fireplaces", "GarageYrBlt", "GarageCars", "GarageArea", "WoodDeckSF", "OpenPorchSF",
    "EnclosedPorch", "3SsnPorch", "ScreenPorch", "PoolArea", "MiscVal", "MoSold", "YrSold", "SalePrice",
)

HOUSE_PRICES = TabularSpec(
    id_column="Id",
    target="SalePrice",
    numeric=NUMERIC_COLUMNS,
    categorical=("MSSubClass", "MoSold", "YrSold"),
    ordinal={c: QUALITY for c in QUALITY_COLUMNS},
    derive=derive_house_features,
)


class HousePricesDataModule(FoldDataModule):
    """House Prices with KFold(n_folds, shuffle=True, random_state=seed) over the 1460 training rows.

    ``drop_outliers`` removes the two known partial sales (GrLivArea > 4000 at a low price) from
    training parts only; validation folds are always scored whole.
    """

    dataset = "house-prices"

    def __init__(
        self,
        data_dir: str | Path = "data",
        n_folds: int = 5,
        fold: int | Sequence[int] | None = 0,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 4096,
        options: PreprocessOptions | None = None,
        drop_outliers: bool = False,
        spec: TabularSpec = HOUSE_PRICES,
        replicas: int = 1,
    ) -> None:
        super().__init__(data_dir, n_folds, fold, seed, batch_size, eval_batch_size, replicas)
        self.spec, self.options, self.drop_outliers = spec, options or PreprocessOptions(), drop_outliers

    @property
    def train_path(self) -> Path:
        return self.data_dir / self.dataset / "train.csv"

    @property
    def test_path(self) -> Path:
        return self.data_dir / self.dataset / "test.csv"

    def load(self) -> np.ndarray:
        self.train_frame = read_csv(self.train_path, self.spec, with_target=True)
        self.test_frame = read_csv(self.test_path, self.spec, with_target=False)
        check_same_columns(self.train_frame, self.test_frame, self.spec, self.test_path)
        y = np.log(self.train_frame[self.spec.target].to_numpy(dtype=np.float64))
        self.targets = torch.from_numpy(y.astype(np.float32))
        self.test_ids = self.test_frame[self.spec.id_column].to_numpy()
        return y

    def training_part(self, rows: np.ndarray) -> np.ndarray:
        if not self.drop_outliers or "GrLivArea" not in self.train_frame:
            return rows
        frame = self.train_frame.iloc[rows]
        outlier = (frame["GrLivArea"] > 4000) & (frame[self.spec.target] < 300_000)
        return rows[~outlier.to_numpy()]

    def fit_features(self, train_rows: list[np.ndarray]) -> tuple[MemberFeatures, MemberFeatures]:
        train, test = [], []
        for rows in train_rows:
            pre = FoldPreprocessor(self.spec, self.options).fit(self.train_frame.iloc[rows])
            train.append(pre.transform(self.train_frame))
            test.append(pre.transform(self.test_frame))
        return (MemberFeatures(torch.from_numpy(stack_members(train))),
                MemberFeatures(torch.from_numpy(stack_members(test))))
