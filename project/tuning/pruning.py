"""Optuna pruning that works across folds."""

from __future__ import annotations

import lightning as L
import optuna


class FoldPruningCallback(L.Callback):
    """Reports the mean validation score over the members being trained after every epoch.

    The step is ``module.step_offset + epoch``: with fold-stacked training all folds share epoch
    ``e``; with sequential folds fold ``i`` reports on steps ``i * max_epochs + e``, so the step keeps
    rising across folds (``current_epoch`` alone restarts at 0 each fold). When Optuna says prune,
    the Trainer stops and ``stopped`` is set; the objective raises ``TrialPruned`` after ``fit()``.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.stopped = trial, False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not pl_module.history:
            return
        record = pl_module.history[-1]
        scores = record[f"val_{pl_module.metric_name}"]
        self.trial.report(sum(scores) / len(scores), pl_module.step_offset + record["epoch"])
        if self.trial.should_prune():
            self.stopped = True
            trainer.should_stop = True
