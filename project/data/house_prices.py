"""House Prices' own features, which its preset names (``data.derive`` in
experiments/configs/house-prices.yaml): row-wise totals and ages."""

from __future__ import annotations

import pandas as pd


def derive_house_features(df: pd.DataFrame) -> pd.DataFrame:
    """Row-wise totals and ages, the features the strongest public solutions add (a column that is
    absent counts as zero)."""
    df = df.copy()

    def zero(column: str) -> pd.Series | float:
        # a missing area or count here means there is none
        return df[column].fillna(0.0) if column in df else 0.0

    df["TotalSF"] = zero("TotalBsmtSF") + zero("1stFlrSF") + zero("2ndFlrSF")
    df["TotalBath"] = zero("FullBath") + 0.5 * zero("HalfBath") + zero("BsmtFullBath") + 0.5 * zero("BsmtHalfBath")
    df["TotalPorchSF"] = sum(
        zero(c) for c in ("OpenPorchSF", "EnclosedPorch", "3SsnPorch", "ScreenPorch", "WoodDeckSF")
    )
    df["HouseAge"] = zero("YrSold") - zero("YearBuilt")
    df["RemodAge"] = zero("YrSold") - zero("YearRemodAdd")
    df["QualSF"] = zero("OverallQual") * zero("GrLivArea")
    return df
