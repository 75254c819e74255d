"""CSV tasks: reading with clear errors, and the per-fold preprocessing fitted on training rows only."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import (
    FunctionTransformer,
    OneHotEncoder,
    QuantileTransformer,
    RobustScaler,
    StandardScaler,
)

from project.config import PreprocessOptions
from project.data.errors import DataError

MISSING = "__missing__"


@dataclass(frozen=True)
class TabularSpec:
    """What a CSV task looks like: its id and target columns and how to read the others.

    ``numeric`` lists columns that must hold numbers (``None``: whatever pandas reads as numbers
    in the training file). ``categorical`` lists columns read as categories even when they hold
    numbers (codes). ``derive`` adds row-wise features; it sees one row at a time in effect, so it
    cannot leak between folds.
    """

    id_column: str
    target: str
    numeric: tuple[str, ...] | None = None
    categorical: tuple[str, ...] = ()
    ordinal: dict[str, dict[str, float]] = field(default_factory=dict)
    derive: Callable[[pd.DataFrame], pd.DataFrame] | None = None


def read_csv(path: Path, spec: TabularSpec, with_target: bool) -> pd.DataFrame:
    """Read and check a CSV, naming the file and column of any problem."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty, expected a CSV with a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV: {err}") from None
    if df.empty:
        raise DataError(f"{path}: no data rows, expected at least one row under the header")
    return check_frame(df, spec, path, with_target)


def check_frame(df: pd.DataFrame, spec: TabularSpec, source: Path, with_target: bool) -> pd.DataFrame:
    """The id (and target) columns present, and the numeric columns as numbers; ``source`` names
    where the rows came from in an error."""
    required = [spec.id_column] + ([spec.target] if with_target else [])
    for column in required:
        if column not in df.columns:
            role = "the target" if column == spec.target else "the row id"
            raise DataError(f"{source}: no column {column!r} ({role}); the header has {len(df.columns)} columns")
    numeric = spec.numeric
    if numeric is None:
        numeric = tuple(df.select_dtypes("number").columns)
    for column in numeric:
        if column in df.columns and column not in (spec.target, spec.id_column):  # ids keep their type
            df[column] = as_numbers(df[column], source, column)
    return df


def as_numbers(column: pd.Series, path: Path, name: str) -> pd.Series:
    """The column as float64; text or an infinite value is an error naming the file, column and line."""
    values = pd.to_numeric(column, errors="coerce") if not pd.api.types.is_numeric_dtype(column) else column
    text = values.isna() & column.notna()
    if text.any():
        row = int(np.flatnonzero(text.to_numpy())[0])
        raise DataError(
            f"{path}: column {name!r} holds text ({column.iloc[row]!r} in line {row + 2}), expected numbers"
        )
    values = values.astype("float64")
    infinite = np.isinf(values.to_numpy())
    if infinite.any():
        row = int(np.flatnonzero(infinite)[0])
        raise DataError(f"{path}: column {name!r} line {row + 2} is {values.iloc[row]}, expected a finite number")
    return values


def check_same_columns(train: pd.DataFrame, test: pd.DataFrame, spec: TabularSpec, test_path: Path) -> None:
    expected = [c for c in train.columns if c != spec.target]
    missing = [c for c in expected if c not in test.columns]
    extra = [c for c in test.columns if c not in expected]
    if missing or extra:
        raise DataError(
            f"{test_path}: columns differ from the training file: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}; expected the training columns without {spec.target!r}"
        )


class SkewedLog1p(TransformerMixin, BaseEstimator):
    """log1p of the non-negative columns whose skewness on the fitted rows exceeds a threshold."""

    def __init__(self, threshold: float = 0.75) -> None:
        self.threshold = threshold

    def fit(self, x: np.ndarray, y=None) -> SkewedLog1p:
        x = np.asarray(x, dtype=np.float64)
        mean, std = x.mean(axis=0), x.std(axis=0)
        skew = np.where(std > 0, ((x - mean) ** 3).mean(axis=0) / np.maximum(std, 1e-12) ** 3, 0.0)
        self.columns_ = (skew > self.threshold) & (x.min(axis=0) >= 0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        x = np.array(x, dtype=np.float64)
        # clip at 0 so a negative value in held-out rows cannot produce NaN
        x[:, self.columns_] = np.log1p(np.clip(x[:, self.columns_], 0, None))
        return x


class QuantileClipper(TransformerMixin, BaseEstimator):
    """Clip each column to the range its fitted rows span between two quantiles, so that an extreme
    held-out value (a huge living area) cannot push a linear model far outside what it was fitted on."""

    def __init__(self, quantile: float = 0.005) -> None:
        self.quantile = quantile

    def fit(self, x: np.ndarray, y=None) -> QuantileClipper:
        x = np.asarray(x, dtype=np.float64)
        self.low_, self.high_ = np.quantile(x, [self.quantile, 1 - self.quantile], axis=0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=np.float64), self.low_, self.high_)


SCALERS = ("standard", "robust", "quantile")


def make_scaler(name: str, rows: int) -> TransformerMixin:
    """A numeric column scaler by name (``SCALERS``), fitted on ``rows`` training rows. ``quantile``
    maps each column through its training rows' quantiles onto a standard normal: heavy tails and
    skew are gone, and a held-out value beyond them lands at the edge, as tabular MLPs like it."""
    if name == "robust":
        return RobustScaler()
    if name == "quantile":
        return QuantileTransformer(output_distribution="normal", n_quantiles=max(2, min(1000, rows)), random_state=0)
    return StandardScaler()


class FoldPreprocessor:
    """Numeric: median imputation (+ indicators), optional log1p of skewed columns, scaling.
    Categorical: a missing-value level, rare-level grouping, one-hot encoding. ``columns_`` is the
    fitted scikit-learn transformer (what a saved predictor keeps); the rest follows from the spec."""

    def __init__(self, spec: TabularSpec, options: PreprocessOptions | None = None) -> None:
        self.spec, self.options = spec, options or PreprocessOptions()

    def restored(self, columns: ColumnTransformer) -> FoldPreprocessor:
        """This preprocessor with an already fitted transformer."""
        self.columns_ = columns
        return self

    def _frame(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.drop(columns=[c for c in (self.spec.id_column, self.spec.target) if c in df.columns])
        if self.spec.derive is not None:
            df = self.spec.derive(df)
        for column, levels in ((c, lv) for c, lv in self.spec.ordinal.items() if c in df):
            df[column] = df[column].map(levels).astype("float64").fillna(0.0)
        return df

    def fit(self, df: pd.DataFrame) -> FoldPreprocessor:
        frame = self._frame(df)
        categorical = [
            c for c in frame.columns if c in self.spec.categorical or not pd.api.types.is_numeric_dtype(frame[c])
        ]
        numeric = [c for c in frame.columns if c not in categorical]
        o = self.options
        numeric_steps = [SimpleImputer(strategy="median", add_indicator=o.missing_indicators, keep_empty_features=True)]
        if o.clip_quantile is not None:
            numeric_steps.append(QuantileClipper(o.clip_quantile))
        if o.skew_threshold is not None:
            numeric_steps.append(SkewedLog1p(o.skew_threshold))
        numeric_steps.append(make_scaler(o.scaler, len(frame)))
        encoder = OneHotEncoder(
            handle_unknown="infrequent_if_exist" if o.min_frequency > 1 else "ignore",
            min_frequency=o.min_frequency if o.min_frequency > 1 else None,
            sparse_output=False,
            dtype=np.float32,
        )
        as_text = FunctionTransformer(categories_as_text, feature_names_out="one-to-one")
        self.columns_ = ColumnTransformer(
            [
                ("numeric", make_pipeline(*numeric_steps), numeric),
                ("categorical", make_pipeline(as_text, encoder), categorical),
            ],
            sparse_threshold=0.0,
        ).fit(frame)
        return self

    def transform(self, df: pd.DataFrame) -> np.ndarray:
        return np.asarray(self.columns_.transform(self._frame(df)), dtype=np.float32)


def categories_as_text(frame: pd.DataFrame) -> np.ndarray:
    """Category columns as text, a missing value as its own level (the one-hot encoder's input)."""
    frame = pd.DataFrame(frame)
    return frame.astype(object).where(frame.notna(), MISSING).astype(str).to_numpy(dtype=object)


def stack_members(matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Stack per-member feature matrices into ``[M, N, F_max]``, zero-padding the narrower ones.

    Fold preprocessors can find different category levels, so widths differ; a zero column adds
    nothing to a linear layer's output, which keeps each member's model exactly its own.
    """
    width = max(m.shape[1] for m in matrices)
    out = np.zeros((len(matrices), matrices[0].shape[0], width), dtype=np.float32)
    for i, m in enumerate(matrices):
        out[i, :, : m.shape[1]] = m
    return out
