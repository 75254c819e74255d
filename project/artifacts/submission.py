"""The deliverable: one row per test row, in file order, in the task's own format, checked before
it is written (and read back and checked again)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import Tensor

from project.data import TARGET_TRANSFORMS
from project.tasks import Task
from project.utils import files


class SubmissionError(ValueError):
    pass


@dataclass(frozen=True)
class SubmissionFormat:
    """What a valid file holds: the id column with ``ids`` in order, then the prediction columns."""

    id_column: str
    columns: tuple[str, ...]
    ids: np.ndarray
    id_range: tuple[int, int] | None = None  # a competition's ids, first..last ascending
    numeric: bool = True  # the columns hold numbers (regression targets, probabilities), not labels
    positive: bool = False  # predictions must be positive (prices through a log transform)
    probabilities: bool = False  # the columns are class probabilities summing to one

    @classmethod
    def of(cls, task: Task, ids: np.ndarray, classes: Sequence | None) -> SubmissionFormat:
        """The task's format for rows with these ids (a classification task's ``classes`` name its
        probability columns)."""
        sub, data = task.preset.submission, task.preset.data
        id_column = sub.id or data.id or "id"
        target = sub.target or data.target or "label"
        columns = tuple(str(c) for c in classes or ()) if sub.probabilities else (target,)
        return cls(
            id_column,
            columns,
            np.asarray(ids),
            (sub.id_range[0], sub.id_range[1]) if sub.id_range else None,
            numeric=task.kind == "regression" or sub.probabilities,
            positive=task.kind == "regression" and data.target_transform == "log",
            probabilities=sub.probabilities,
        )


def check_submission(frame: pd.DataFrame, fmt: SubmissionFormat, source: str = "submission") -> None:
    """Raise SubmissionError unless ``frame`` is exactly what ``fmt`` says."""
    header = [fmt.id_column, *fmt.columns]
    if list(frame.columns) != header:
        raise SubmissionError(f"{source}: header is {list(frame.columns)}, expected {header}")
    if len(frame) != len(fmt.ids):
        raise SubmissionError(f"{source}: {len(frame)} rows, expected {len(fmt.ids)} (one per test row)")
    ids = frame[fmt.id_column].astype(str).to_numpy()
    if fmt.id_range is not None and not np.array_equal(
        ids, np.arange(fmt.id_range[0], fmt.id_range[1] + 1).astype(str)
    ):
        raise SubmissionError(
            f"{source}: column {fmt.id_column!r} must be {fmt.id_range[0]}..{fmt.id_range[1]} ascending"
        )
    if not np.array_equal(ids, fmt.ids.astype(str)):
        raise SubmissionError(f"{source}: column {fmt.id_column!r} differs from the test file's ids in file order")
    if not fmt.numeric:
        return
    values = frame[list(fmt.columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if fmt.positive:
        bad |= (values <= 0).any(axis=1)
    if fmt.probabilities:
        bad |= (values < 0).any(axis=1) | (np.abs(values.sum(axis=1) - 1) > 1e-4)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        expected = (
            "probabilities summing to one"
            if fmt.probabilities
            else ("a finite positive number" if fmt.positive else "a finite number")
        )
        raise SubmissionError(f"{source}: line {row + 2} is {values[row].tolist()}, expected {expected}")


def write_submission(frame: pd.DataFrame, fmt: SubmissionFormat, path: Path) -> Path:
    """Validate, then write; nothing is written when validation fails."""
    check_submission(frame, fmt, str(path))
    with files.atomic_path(path, "the submission") as tmp:
        frame.to_csv(tmp, index=False)
        check_submission(pd.read_csv(tmp, dtype={fmt.id_column: str}), fmt, str(path))
    return path


def prediction_frame(task: Task, fmt: SubmissionFormat, classes: Sequence | None, outputs: Tensor) -> pd.DataFrame:
    """The rows of a submission from the members' averaged outputs (``Predictor.averaged``): a
    regression target on its original scale, or labels (class probabilities where the preset asks)."""
    columns = {fmt.id_column: fmt.ids}
    if task.kind == "regression":
        inverse = TARGET_TRANSFORMS[task.preset.data.target_transform].inverse
        columns[fmt.columns[0]] = inverse(outputs.double()).numpy()
    elif fmt.probabilities:
        columns.update(zip(fmt.columns, outputs.double().numpy().T))
    else:
        columns[fmt.columns[0]] = np.asarray(classes, dtype=object)[outputs.argmax(dim=-1).numpy()]
    return pd.DataFrame(columns)
