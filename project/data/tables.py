"""A CSV task: ``train.csv`` and ``test.csv`` with an id and a target column; regression on the
target (optionally log-transformed) or classification of its labels (numbers or text)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from project.config import Preset, PresetError, derive_function
from project.data.base import FoldDataModule
from project.data.batches import MemberFeatures
from project.data.errors import DataError
from project.data.kinds import register_data_kind
from project.data.sources import DATASETS
from project.data.tabular import (
    FoldPreprocessor,
    PreprocessOptions,
    TabularSpec,
    as_numbers,
    check_frame,
    check_same_columns,
    read_csv,
    stack_members,
)


@dataclass(frozen=True)
class TargetTransform:
    """What the model learns instead of a regression target, and the way back."""

    name: str
    forward: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[Tensor], Tensor]
    valid: Callable[[np.ndarray], np.ndarray]
    expected: str


TARGET_TRANSFORMS = {
    "none": TargetTransform("none", lambda y: y, lambda y: y, np.isfinite, "a finite number"),
    "log": TargetTransform("log", np.log, torch.exp, lambda y: np.isfinite(y) & (y > 0), "a positive number"),
    "log1p": TargetTransform("log1p", np.log1p, torch.expm1, lambda y: np.isfinite(y) & (y > -1), "a number above -1"),
}


def refuse_duplicate_ids(frame: pd.DataFrame, column: str, path: Path) -> None:
    repeated = frame[column].duplicated(keep=False).to_numpy()
    if repeated.any():
        rows = np.flatnonzero(repeated)
        value = frame[column].iloc[rows[0]]
        lines = [int(r) + 2 for r in rows if frame[column].iloc[r] == value][:2]
        shown = value.item() if isinstance(value, np.generic) else value
        raise DataError(
            f"{path}: column {column!r} repeats id {shown!r} (lines {lines[0]} and {lines[1]}); expected one row per id"
        )


@register_data_kind("csv")
class TableDataModule(FoldDataModule):
    """K-fold over the rows of a CSV task, preprocessing fitted per fold on its training part.

    Regression targets are learnt through ``target_transform`` (``log`` for prices: the error is then
    relative, as in Kaggle's RMSLE); classification labels become class indices ``0..C-1`` in sorted
    order (``classes``). ``drop_train_rows`` (a pandas query) leaves rows out of training parts only;
    validation folds are always scored whole.
    """

    def __init__(
        self,
        spec: TabularSpec,
        kind: str = "regression",
        target_transform: str = "none",
        options: PreprocessOptions | None = None,
        drop_train_rows: str | None = None,
        train_file: str = "train.csv",
        test_file: str = "test.csv",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.spec, self.kind, self.options = spec, kind, options or PreprocessOptions()
        self.transform = TARGET_TRANSFORMS[target_transform]
        self.drop_train_rows, self.train_file, self.test_file = drop_train_rows, train_file, test_file
        self.classes: np.ndarray | None = None

    tabular = True

    @classmethod
    def from_preset(cls, preset: Preset, **common: Any) -> TableDataModule:
        data = preset.data
        return cls(
            cls.spec_of(preset),
            kind=preset.kind,
            target_transform=data.target_transform,
            options=data.preprocess,
            drop_train_rows=data.drop_train_rows,
            train_file=data.train or "train.csv",
            test_file=data.test or "test.csv",
            **common,
        )

    @classmethod
    def spec_of(cls, preset: Preset) -> TabularSpec:
        """How the preset's table columns are read."""
        data = preset.data
        assert data.id is not None and data.target is not None, "check_preset requires both"
        return TabularSpec(
            id_column=data.id,
            target=data.target,
            numeric=None if data.numeric is None else tuple(data.numeric),
            categorical=tuple(data.categorical),
            ordinal=dict(data.ordinal),
            derive=derive_function(data.derive, preset.source),
        )

    @classmethod
    def rows_of(cls, preset: Preset, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw table rows as reading the test file makes them (numbers where the preset says so),
        whether they come from a file or a request."""
        return check_frame(frame.copy(), cls.spec_of(preset), Path("input rows"), with_target=False)

    @classmethod
    def check_preset(cls, preset: Preset, path: Path) -> None:
        for key in ("id", "target"):
            if not getattr(preset.data, key):
                raise PresetError(f"{path}: key 'data.{key}': missing; a CSV task names its {key} column")

    @classmethod
    def check_files(cls, preset: Preset, data_dir: Path) -> None:
        """The train and test files are there, with the columns the preset names (headers alone
        are read); a data set with pinned sources may be missing: it is fetched."""
        data, source = preset.data, preset.source
        folder = Path(data_dir) / data.dataset
        for key, default in (("train", "train.csv"), ("test", "test.csv")):
            path = folder / (getattr(data, key) or default)
            if not path.is_file():
                if data.dataset in DATASETS:
                    continue  # fetched from its sources before it is read
                raise PresetError(f"{source}: key 'data.{key}': {path} not found; expected the {key} file there")
            try:
                header = list(pd.read_csv(path, nrows=0).columns)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
                continue  # reading the data itself names what is wrong with the file
            for name in ("id", "target") if key == "train" else ("id",):
                column = getattr(data, name)
                if column not in header:
                    raise PresetError(
                        f"{source}: key 'data.{name}': {path} has no column {column!r}; "
                        f"its header has {len(header)} columns"
                    )

    @classmethod
    def features_of(cls, preset: Preset, raw: Any, inputs: dict, preprocessors: list | None) -> MemberFeatures:
        frame = cls.rows_of(preset, raw)
        return MemberFeatures(torch.from_numpy(stack_members([p.transform(frame) for p in preprocessors or []])))

    @property
    def train_path(self) -> Path:
        return self.data_dir / self.dataset / self.train_file

    @property
    def test_path(self) -> Path:
        return self.data_dir / self.dataset / self.test_file

    @property
    def out_features(self) -> int:
        if self.kind == "regression":
            return 1
        if self.classes is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: call prepare_data() and setup() first")
        return len(self.classes)

    def load(self) -> np.ndarray:
        self.train_frame = read_csv(self.train_path, self.spec, with_target=True)
        self.test_frame = read_csv(self.test_path, self.spec, with_target=False)
        check_same_columns(self.train_frame, self.test_frame, self.spec, self.test_path)
        for frame, path in ((self.train_frame, self.train_path), (self.test_frame, self.test_path)):
            refuse_duplicate_ids(frame, self.spec.id_column, path)
        raw = self.train_frame[self.spec.target]
        missing = raw.isna().to_numpy()
        if missing.any():
            raise DataError(
                f"{self.train_path}: column {self.spec.target!r} line {np.flatnonzero(missing)[0] + 2} "
                "is empty; expected a target in every row"
            )
        if self.kind == "regression":
            y = self._transformed(as_numbers(raw, self.train_path, self.spec.target).to_numpy())
            self.targets = torch.from_numpy(y.astype(np.float32))
        else:
            self.classes, y = np.unique(raw.to_numpy(), return_inverse=True)
            if len(self.classes) < 2:
                raise DataError(
                    f"{self.train_path}: column {self.spec.target!r} holds one label, "
                    f"{self.classes[0]!r}; expected two classes or more"
                )
            self.targets = torch.from_numpy(y.astype(np.int64))
        self.test_ids = self.test_frame[self.spec.id_column].to_numpy()
        self._dropped = self._rows_to_drop()
        return y

    def _transformed(self, values: np.ndarray) -> np.ndarray:
        bad = ~self.transform.valid(values)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{self.train_path}: column {self.spec.target!r} row {row + 2}: {float(values[row])!r}, expected "
                f"{self.transform.expected} in every row (target transform {self.transform.name!r})"
            )
        return self.transform.forward(values.astype(np.float64))

    def _rows_to_drop(self) -> np.ndarray:
        if not self.drop_train_rows:
            return np.zeros(len(self.train_frame), dtype=bool)
        try:
            drop = self.train_frame.eval(self.drop_train_rows)
        except Exception as err:  # noqa: BLE001 - pandas raises many kinds for a bad expression
            raise DataError(
                f"{self.train_path}: drop_train_rows {self.drop_train_rows!r} cannot be evaluated on its columns: {err}"
            ) from None
        return np.asarray(drop, dtype=bool)

    def training_part(self, rows: np.ndarray) -> np.ndarray:
        return rows[~self._dropped[rows]]

    def fit_features(self, train_rows: list[np.ndarray]) -> tuple[MemberFeatures, MemberFeatures, list]:
        preprocessors = [
            FoldPreprocessor(self.spec, self.options).fit(self.train_frame.iloc[rows]) for rows in train_rows
        ]
        return (
            MemberFeatures(torch.from_numpy(stack_members([p.transform(self.train_frame) for p in preprocessors]))),
            MemberFeatures(torch.from_numpy(stack_members([p.transform(self.test_frame) for p in preprocessors]))),
            preprocessors,
        )

    def test_inputs(self) -> pd.DataFrame:
        """The test file as pandas reads it (the predictor reads numbers as the preset says)."""
        return pd.read_csv(self.test_path)

    def data_files(self) -> dict:
        return {"training": (self.train_path, self.train_frame), "testing": (self.test_path, self.test_frame)}
