"""Models of another kind in a study's ensemble library: the scikit-learn estimators a preset lists
under ``sweep.estimators``.

Each is fitted on every fold's training part, with that fold's own preprocessing (the features the
trials' fold models saw) and without the rows the preset leaves out of training parts, then kept as
a trial's predictions are: every validated row by the fold model that did not train on it, every
test row by the fold models' average (regression on the learnt scale, classification as class
probabilities). The selection (``project/ensemble/selection.py``) then weighs them beside the trials. They
are deterministic given the folds and their arguments (a ``random_state`` included), so they are
fitted again at each export rather than stored in the study.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import cast

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from project.config import instantiate
from project.data import TableDataModule
from project.ensemble.selection import Predictions, cv_score
from project.tasks import Task


class EstimatorFailed(RuntimeError):
    """An estimator the preset lists could not be fitted; the message names its key."""


@dataclass
class FittedEstimator:
    """One estimator fitted on each fold: the fold models, what they predict and their scores."""

    name: str
    reference: str
    args: dict
    models: list  # one per fold, in the order of the data module's members
    predictions: Predictions
    fold_scores: list[float]
    cv: float  # the mean of the folds' scores, as a trial's CV score
    seconds: float


def predict(task: Task, model, x: np.ndarray, classes: int) -> np.ndarray:
    """Regression values, or the probabilities of all ``classes`` (a class missing from a fold's
    training part gets none)."""
    if task.kind == "regression":
        return np.asarray(model.predict(x), dtype=np.float64).reshape(len(x))
    probabilities = np.zeros((len(x), classes))
    probabilities[:, np.asarray(model.classes_, dtype=np.int64)] = model.predict_proba(x)
    return probabilities


def cross_fit(task: Task, name: str, datamodule: TableDataModule) -> FittedEstimator:
    """Fit the preset's estimator ``name`` on each of the data module's folds (set up, a CSV task)."""
    spec = task.preset.sweep.estimators[name]
    members, started = datamodule.members, time.perf_counter()
    y = datamodule.targets.numpy()
    classes = datamodule.out_features
    models, oof, test = [], np.zeros((len(y),) if task.kind == "regression" else (len(y), classes)), []
    assert members.preprocessors is not None, "a table's members each have their preprocessing"
    for preprocessor, train, val in zip(members.preprocessors, members.train_rows, members.val_rows):
        x = preprocessor.transform(datamodule.train_frame)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # a Lasso's last digits, not its use
                model = instantiate(spec.estimator, spec.args).fit(x[train.numpy()], y[train.numpy()])
        except (TypeError, ValueError) as err:  # scikit-learn checks its arguments' values when it fits
            raise EstimatorFailed(
                f"{task.preset.source or task.name}: key 'sweep.estimators.{name}': "
                f"{spec.estimator} did not fit: {str(err).splitlines()[0]}"
            ) from None
        models.append(model)
        oof[val.numpy()] = predict(task, model, x[val.numpy()], classes)
        test.append(predict(task, model, preprocessor.transform(datamodule.test_frame), classes))
    rows = np.sort(np.concatenate([v.numpy() for v in members.val_rows]))
    folds = np.zeros(len(y), dtype=np.int64)
    for fold, val in zip(members.folds, members.val_rows):
        folds[val.numpy()] = cast(int, fold)  # every member validates one fold
    predictions = Predictions(rows, folds[rows], oof[rows], np.mean(test, axis=0))
    fold_scores = [cv_score(task, oof[val.numpy()], y[val.numpy()], np.zeros(len(val))) for val in members.val_rows]
    return FittedEstimator(
        name=name,
        reference=spec.estimator,
        args=dict(spec.args),
        models=models,
        predictions=predictions,
        fold_scores=fold_scores,
        cv=float(np.mean(fold_scores)),
        seconds=time.perf_counter() - started,
    )
