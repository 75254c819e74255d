"""Write and validate a Kaggle House Prices submission (and the image tasks' prediction files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from project.cv import CVResult, predict_members
from project.data import FoldDataModule

EXPECTED_IDS = np.arange(1461, 2920)  # the 1459 rows of the competition's test.csv


class SubmissionError(ValueError):
    pass


def check_submission(frame: pd.DataFrame, source: str = "submission") -> None:
    """Raise SubmissionError unless ``frame`` is exactly what Kaggle accepts for House Prices."""
    if list(frame.columns) != ["Id", "SalePrice"]:
        raise SubmissionError(f"{source}: header is {list(frame.columns)}, expected ['Id', 'SalePrice']")
    if len(frame) != len(EXPECTED_IDS):
        raise SubmissionError(f"{source}: {len(frame)} rows, expected {len(EXPECTED_IDS)}")
    ids = frame["Id"].to_numpy()
    if not np.array_equal(ids, EXPECTED_IDS):
        raise SubmissionError(f"{source}: column 'Id' must be 1461..2919 ascending")
    prices = pd.to_numeric(frame["SalePrice"], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(prices) | (prices <= 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise SubmissionError(f"{source}: column 'SalePrice' row {row + 2} is {frame['SalePrice'].iloc[row]!r}, "
                              "expected a finite positive price")


def write_submission(ids: np.ndarray, prices: np.ndarray, path: Path) -> Path:
    """Validate, then write ``Id,SalePrice``; nothing is written when validation fails."""
    frame = pd.DataFrame({"Id": np.asarray(ids).astype(np.int64), "SalePrice": np.asarray(prices, dtype=np.float64)})
    check_submission(frame, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    check_submission(pd.read_csv(path), str(path))
    return path


def write_labels(labels: np.ndarray, path: Path) -> Path:
    """Image tasks: one ``id,label`` row per official test image, in file order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": np.arange(len(labels)), "label": np.asarray(labels, dtype=np.int64)}).to_csv(path, index=False)
    return path


def fold_average_submission(result: CVResult, datamodule: FoldDataModule, path: Path) -> Path:
    """Average the K fold models' log-price predictions on test.csv: the submission is made of
    exactly the models that cross-validation scored, at no extra training cost."""
    log_prices = torch.cat([predict_members(f.module, datamodule, f.members) for f in result.fits]).mean(dim=0)
    return write_submission(datamodule.test_ids, np.exp(log_prices.double().numpy()), path)
