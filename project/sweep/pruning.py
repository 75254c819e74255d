"""Optuna pruning that works across folds and across schedules of different lengths.

Trials report their progress at the same fractions of their own schedule, not at the same epoch:
a 40-epoch trial at epoch 10 is compared with a 160-epoch one at epoch 40, both a quarter through
(a long or cosine schedule looks worse early than a short one, and an epoch-indexed pruner cut
such trials although they would have ended among the best; the README has the measurement).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import lightning as L
import optuna

from project.config.schema import Direction
from project.engine import FoldModule

GRID = 20  # a trial reports at every twentieth of its schedule
WARMUP = GRID // 2  # none is pruned before half its schedule
STARTUP_TRIALS = 6  # nor before that many trials have completed
PERCENTILE = 75.0  # a trial is cut where it is worse than three quarters of the completed trials


def make_pruner() -> optuna.pruners.BasePruner:
    """The sweep's pruner: from half its schedule on, a trial stops where its score is worse than
    the 75th percentile of the completed trials' at the same fraction of theirs (the median, or a
    quarter of the schedule, cut trials that would have ended among the best: README)."""
    return optuna.pruners.PercentilePruner(PERCENTILE, n_startup_trials=STARTUP_TRIALS, n_warmup_steps=WARMUP)


def grid_steps(epoch: int, max_epochs: int, reported: int) -> range:
    """The grid steps (1..GRID) that the end of ``epoch`` (from 0) reaches and that were not yet
    reported (``reported``: the last one that was); a schedule shorter than GRID epochs reports
    several at once, with the same score, so every trial has a value at every step."""
    return range(reported + 1, GRID * (epoch + 1) // max_epochs + 1)


class FoldPruningCallback(L.Callback):
    """Reports the mean validation score over the members being trained at each grid step.

    Stacked folds share their schedule and report at steps 1..GRID; folds trained one after another
    report fold ``i`` at steps ``i * GRID + 1 .. (i + 1) * GRID``, so the step keeps rising across
    their fits. When Optuna says prune, the Trainer stops and ``stopped`` is set; the objective
    raises ``TrialPruned`` after ``fit()``.
    """

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial, self.stopped, self.step_offset, self.reported = trial, False, 0, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        module = cast(FoldModule, pl_module)
        if trainer.sanity_checking or not module.history:
            return
        record = module.history[-1]
        steps = grid_steps(record["epoch"], cast(int, trainer.max_epochs), self.reported)
        if not steps:
            return
        scores = record[f"val_{module.metric_name}"]
        for step in steps:
            self.trial.report(sum(scores) / len(scores), self.step_offset + step)
        self.reported = steps[-1]
        if self.trial.should_prune():
            self.stopped = True
            trainer.should_stop = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_offset, self.reported = self.step_offset + GRID, 0


StepsFn = Callable[[int, int, int], range]  # (epoch, max_epochs, last step reported) -> the steps to report


def replay(
    pruner: optuna.pruners.BasePruner,
    curves: dict[int, list[float]],
    direction: Direction = "minimize",
    steps: StepsFn = grid_steps,
) -> dict[int, int | None]:
    """What ``pruner`` makes of trials whose every epoch's score is known (``curves``: trial number ->
    mean validation score after each epoch, run to the end), taken in number order as one worker
    would: for each trial, the epoch (from 0) after which it is pruned, or None where it completes."""
    study = optuna.create_study(direction=direction, pruner=pruner)
    verdicts: dict[int, int | None] = {}
    for number, curve in sorted(curves.items()):
        trial, reported, verdicts[number] = study.ask(), 0, None
        for epoch, value in enumerate(curve):
            new = steps(epoch, len(curve), reported)
            if not new:
                continue
            for step in new:
                trial.report(value, step)
            reported = new[-1]
            if trial.should_prune():
                verdicts[number] = epoch
                break
        if verdicts[number] is None:
            study.tell(trial, curve[-1])
        else:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    return verdicts
