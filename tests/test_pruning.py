"""The sweep's pruner compares trials at the same fraction of their schedules."""

import optuna
import pytest

from project.config import TrainConfig
from project.cv import cross_validate
from project.sweep.pruning import GRID, FoldPruningCallback, grid_steps, make_pruner, replay
from tests.conftest import house_task_dm


def test_every_schedule_reports_every_grid_step_once():
    for max_epochs in (3, 20, 40, 160):
        steps = []
        for epoch in range(max_epochs):
            steps += grid_steps(epoch, max_epochs, steps[-1] if steps else 0)
        assert steps == list(range(1, GRID + 1))
    # a quarter through: epoch 10 of 40 and epoch 40 of 160 report the same step
    assert grid_steps(9, 40, 4)[-1] == grid_steps(39, 160, 4)[-1] == GRID // 4


@pytest.mark.parametrize("stacking, fits", [("auto", 1), ("sequential", 3)])
def test_trials_of_different_lengths_report_at_the_same_steps(house_dir, stacking, fits):
    """The value at a step is the score of the epoch that reached that fraction of the schedule."""
    task, dm = house_task_dm(house_dir)
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    for max_epochs in (4, 7):
        trial = study.ask()
        config = TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=max_epochs, batch_size=16)
        result = cross_validate(task, config, stacking=stacking, callbacks=[FoldPruningCallback(trial)], datamodule=dm)
        values = study.trials[-1].intermediate_values
        assert sorted(values) == list(range(1, fits * GRID + 1))
        last_of_first_fit = sum(h[-1]["val_rmse"] for h in result.history[: 3 // fits]) / (3 // fits)
        assert values[GRID] == pytest.approx(last_of_first_fit)
        first_epoch = GRID // max_epochs  # the steps the first epoch reached
        assert values[1] == values[first_epoch] != values[first_epoch + 1]


def test_no_trial_is_pruned_before_half_its_schedule():
    study = optuna.create_study(pruner=make_pruner())
    for _ in range(6):
        trial = study.ask()
        for step in range(1, GRID + 1):
            trial.report(0.1, step)
        study.tell(trial, 0.1)
    trial = study.ask()
    pruned_at = None
    for step in range(1, GRID + 1):
        trial.report(1.0, step)  # worse than every completed trial from the start
        if trial.should_prune():
            pruned_at = step
            break
    assert pruned_at == GRID // 2


def test_a_long_schedule_that_ends_best_is_kept_where_an_epoch_indexed_pruner_cuts_it():
    def line(start, end, epochs):
        return [start + (end - start) * e / (epochs - 1) for e in range(epochs)]

    curves = {n: line(1.0, 0.5 + 0.01 * n, 20) for n in range(6)}  # six short trials
    curves[6] = line(1.0, 0.3, 80)  # slower at first, best at the end
    epoch_indexed = replay(
        optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=10),
        curves,
        steps=lambda epoch, max_epochs, reported: range(epoch, epoch + 1),
    )
    assert epoch_indexed[6] == 10
    assert replay(make_pruner(), curves) == dict.fromkeys(range(7))
