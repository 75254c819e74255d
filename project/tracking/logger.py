"""The project's MLflow tracking as a Lightning logger: a fit's epoch metrics reach its run while
it trains.

A sweep's trial or a ``train.py`` run owns one MLflow run (``Tracker.start_run``); every fit of it
(the stacked folds, each fold trained alone, a refit) gets a fresh ``RunLogger`` writing into that
run, so the MLflow UI shows each fold's curves (``val/rmse/fold_2``, ``train/loss/fold_2``, the
mean over the fit's folds as ``val/rmse``, a ``LearningRateMonitor``'s ``lr-AdamW``) during a trial
of minutes, not after it. The writes are batched: at most one MLflow request every ``every``
seconds and one at the end of the fit, so that a trial of small tables, whose epochs take
milliseconds, is not slowed. They go through the ``Tracker``, whose journal keeps them through a
tracking outage as it keeps every other write.
"""

from __future__ import annotations

import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger

from project.tracking.tracker import Tracker


def run_loggers(tracker: Tracker, run_id: str, name: str, save_dir: str | Path | None = None):
    """What ``cross_validate(loggers=...)`` takes: a fresh ``RunLogger`` of the run for each fit, its
    version the fit's label (``folds_0-4``, ``fold_2``, ``refit_3_seeds``)."""

    def make(label: str) -> RunLogger:
        version = label.replace(",", "").replace(" ", "_")
        return RunLogger(tracker, run_id, name, version, save_dir)

    return [make]


class RunLogger(Logger):
    """A Lightning ``Logger`` that writes into the MLflow run ``run_id``: the epoch (Lightning's
    ``epoch`` entry) is each metric's step. ``name`` and ``version`` say where a checkpoint of the
    fit goes under ``save_dir`` (``<save_dir>/<name>/<version>/checkpoints``)."""

    def __init__(
        self,
        tracker: Tracker,
        run_id: str,
        name: str,
        version: str,
        save_dir: str | Path | None = None,
        every: float = 2.0,
    ) -> None:
        super().__init__()
        self.tracker, self.run_id, self.every = tracker, run_id, every
        self._name, self._version = name, version
        self._save_dir = None if save_dir is None else str(save_dir)
        self._rows: list[list] = []
        self._sent = -float("inf")  # the first epoch is sent at once

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        """The run's parameters are the configuration's, logged once by its owner."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        values = dict(metrics)
        epoch = values.pop("epoch", None)
        at = int(epoch) if epoch is not None else int(step or 0)
        now = int(time.time() * 1000)
        self._rows += [[key, float(value), now, at] for key, value in values.items()]

    def save(self) -> None:
        """Lightning calls this after every ``log_metrics``: what is waiting is sent once ``every``
        seconds have passed since the last send."""
        if self._rows and time.monotonic() - self._sent >= self.every:
            self._send()

    def finalize(self, status: str) -> None:
        """The end of the fit, whatever its status: the rest is sent."""
        self._send()

    def _send(self) -> None:
        if self._rows:
            rows, self._rows = self._rows, []
            self.tracker.log_rows(self.run_id, rows)  # one request (a few for many metrics)
        self._sent = time.monotonic()
