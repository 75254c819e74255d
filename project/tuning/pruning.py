"""Optuna pruning that works across folds."""

from __future__ import annotations

import lightning as L
import optuna


class FoldPruningCallback(L.Callback):
    """Reports the mean validation score over the members being trained after every epoch.

    Stacked folds share epoch ``e`` and report at step ``e``; folds trained one after another
    report fold ``i`` at steps ``i * max_epochs + e``, so the step keeps rising across their fits
    (``current_epoch`` alone restarts at 0 each fit). When Optuna says prune, the Trainer stops
    and ``stopped`` is set; the objective raises ``TrialPruned`` after ``fit()``.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.stopped, self.step_offset = trial, False, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.history:
            return
        record = pl_module.history[-1]
        scores = record[f"val_{pl_module.metric_name}"]
        self.trial.report(sum(scores) / len(scores), self.step_offset + record["epoch"])
        if self.trial.should_prune():
            self.stopped = True
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_offset += trainer.max_epochs
