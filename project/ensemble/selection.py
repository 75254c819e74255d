"""Out-of-fold predictions of every trial, and an ensemble selected from the whole study.

Each completed trial keeps what its fold models predict: every validated training row by the one
fold model that did not train on it (out of fold), and, for a task scored on a test file, every
test row by the fold models' average; regression on the scale the model learns, classification as
class probabilities. ``select`` is greedy ensemble selection with replacement on those out-of-fold
predictions (Caruana et al., 2004, as auto-sklearn and AutoGluon do it): start empty, and at each
of ``rounds`` steps add (again, if it helps most) the trial whose addition gives the best score of
the averaged predictions; a trial's weight is the share of steps that chose it. A preset's
scikit-learn estimators keep the same predictions (``project/ensemble/estimators.py``) and are chosen from
the same library, by name.

The ensemble's out-of-fold score is chosen on the same folds it is reported on, so it is
optimistic, as the best trial's CV score is; ``held_out_score`` measures how much the selection
adds to that (each fold scored by weights chosen on the others), and the test split or the
leaderboard says the rest.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.config import TrainConfig
from project.cv import CVResult, predict_members
from project.data import FoldDataModule
from project.tasks import Task
from project.utils import files

Member = int | str  # a library member: a trial's number or an estimator's name
ROUNDS = 50  # auto-sklearn's ensemble_size


@dataclass
class Predictions:
    """One trial's out-of-fold predictions of ``rows`` (training row indices, sorted) and the fold
    each row was validated in; where the task has a test file to predict, its test predictions."""

    rows: np.ndarray
    folds: np.ndarray  # [R]
    oof: np.ndarray  # [R] or [R, C]
    test: np.ndarray | None = None  # [N] or [N, C]

    def to_bytes(self) -> bytes:
        """The ``.npz`` file's contents."""
        arrays: dict[str, Any] = {"rows": self.rows, "folds": self.folds, "oof": self.oof}
        if self.test is not None:
            arrays["test"] = self.test
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: Path, what: str = "kept predictions") -> Path:
        return files.write_bytes(path, self.to_bytes(), what)

    @classmethod
    def load(cls, path: Path) -> Predictions:
        """Raises ``zipfile.BadZipFile`` (a truncated file), ``OSError``, ``ValueError`` or
        ``KeyError`` (an array missing) where the file is not a whole one."""
        with np.load(path, allow_pickle=False) as saved:
            return cls(saved["rows"], saved["folds"], saved["oof"], saved.get("test", None))


@torch.no_grad()
def out_of_fold(task: Task, result: CVResult, datamodule: FoldDataModule, with_test: bool = True) -> Predictions:
    """What the fold models of ``result`` predict: each its own validation rows, and (``with_test``)
    the test rows, averaged over the folds."""
    rows, folds, oof, test = [], [], [], []
    for fit in result.fits:  # on the device each fit trained on
        module = fit.module.to(fit.device).eval()
        loader = datamodule.val_loader(fit.members, nonzero=module.net.accepts_nonzero, device=fit.device)
        outputs = torch.cat([module.predict_step(b, 0).cpu() for b in loader], dim=1)  # [M, padded rows, ...]
        for m, val in enumerate(fit.members.val_rows):
            rows.append(val.numpy())
            folds.append(np.full(len(val), fit.members.folds[m]))
            oof.append(module.head.predictions(outputs[m, : len(val)].double()).numpy())
        if with_test:
            test.append(module.head.predictions(predict_members(module, datamodule, fit.members, fit.device).double()))
        module.cpu()
    every_row, every_fold, every_oof = np.concatenate(rows), np.concatenate(folds), np.concatenate(oof)
    order = np.argsort(every_row, kind="stable")
    return Predictions(
        every_row[order],
        every_fold[order],
        every_oof[order],
        torch.cat(test).mean(dim=0).numpy() if with_test else None,
    )


def scores(task: Task, candidates: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The task's metric of each of ``candidates`` ``[T, R, ...]`` against ``targets`` ``[R]``,
    computed by the task's own stacked metric (one member per candidate)."""
    count = len(candidates)
    y = torch.as_tensor(targets).expand(count, -1)
    head = task.head(TrainConfig(), [torch.as_tensor(targets, dtype=torch.float32)] * count)
    metric = head.metric()
    preds = torch.as_tensor(candidates)
    if task.kind != "regression":  # probabilities to logits: the argmax and the softmax are the same
        preds = preds.clamp(min=1e-12).log()
    metric.update(preds, y, torch.ones(y.shape, dtype=torch.float64))
    return np.atleast_1d(metric.compute().double().numpy())  # torchmetrics returns one value as a scalar


def cv_score(task: Task, predictions: np.ndarray, targets: np.ndarray, folds: np.ndarray) -> float:
    """The mean over folds of each fold's score, as a trial's CV score is made."""
    return float(
        np.mean([scores(task, predictions[folds == k][None], targets[folds == k])[0] for k in np.unique(folds)])
    )


def select(
    task: Task, library: dict[Member, Predictions], targets: np.ndarray, rounds: int = ROUNDS
) -> dict[Member, float]:
    """Greedy ensemble selection with replacement over ``library`` (a trial's number, or an
    estimator's name -> its predictions, all of the same rows; ``targets`` are those rows'
    targets): each member's weight, summing to 1. A tie goes to the first in ``library``."""
    numbers = list(library)
    rows = library[numbers[0]].rows
    if any(not np.array_equal(library[n].rows, rows) for n in numbers):
        raise ValueError("the trials' out-of-fold predictions cover different rows; they come from different folds")
    stack = np.stack([library[n].oof for n in numbers])
    better = np.argmin if task.direction == "minimize" else np.argmax
    current, chosen = np.zeros_like(stack[0]), Counter[Member]()
    for step in range(1, rounds + 1):
        candidates = (current * (step - 1) + stack) / step
        best = int(better(scores(task, candidates, targets)))
        chosen[numbers[best]] += 1
        current = candidates[best]
    return {n: chosen[n] / rounds for n in numbers if chosen[n]}


def held_out_score(
    task: Task, library: dict[Member, Predictions], targets: np.ndarray, folds: np.ndarray
) -> float | None:
    """The selection's own cross-validation: each fold scored by the ensemble selected on the other
    folds' out-of-fold rows, the mean over folds. Unlike the score of the ensemble selected on every
    row, no row helps choose the weights it is scored with (None with one validated fold)."""
    if len(np.unique(folds)) < 2:
        return None
    fold_scores = []
    for k in np.unique(folds):
        part = folds != k
        weights = select(
            task, {n: Predictions(p.rows[part], p.folds[part], p.oof[part]) for n, p in library.items()}, targets[part]
        )
        mix = sum(w * library[n].oof[~part] for n, w in weights.items())
        fold_scores.append(scores(task, mix[None], targets[~part])[0])
    return float(np.mean(fold_scores))


def blend(library: dict[Member, Predictions], weights: dict[Member, float], part: str = "oof") -> np.ndarray:
    """The weighted average of the members' ``part`` ("oof" or "test") predictions."""
    return sum(w * getattr(library[n], part) for n, w in weights.items())
