"""The end of a task that refits (``final.refit`` in its preset, the image tasks): train on every
training row, then score the test split once, where it has labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from project.artifacts.predictor import Ensemble, Predictor, Predicts
from project.config import TrainConfig
from project.cv import Fit, fit, fold_layout, make_trainer
from project.ensemble.selection import scores as ensemble_scores
from project.tasks import Task
from project.utils.devices import training_device

REPORTED = {"acc": "accuracy"}  # the name a metric is reported under, where it is not its own


@dataclass(frozen=True)
class Refit:
    """One configuration to refit: ``seeds`` members of it that differ only in their seeds, and its
    weight in the average of the configurations (a trial of the study's ensemble)."""

    config: TrainConfig
    seeds: int = 1
    weight: float = 1.0
    trial: int | None = None


def refit_and_test(
    task: Task, refits: Sequence[Refit], data_dir: str | Path, seed: int, predictions_path: Path | None = None
) -> tuple[Predicts, dict]:
    """Refit every configuration of ``refits`` on every training row, each member on a seed of its
    own (a configuration's seeds stacked or one after another, as the engine measured faster); then
    score the test split once, with the weighted average of the configurations' class probabilities
    (each the average of its seeds'), and each member alone for comparison, and write the predictions."""
    datamodule = task.prepared(data_dir, fold=None, seed=seed, replicas=sum(r.seeds for r in refits))
    predictors, fits, first, device = [], [], 0, training_device()
    for refit in refits:
        members = datamodule.members.select(range(first, first + refit.seeds))
        first += refit.seeds
        layout = fold_layout(task, refit.config, datamodule, len(members), seed)
        groups = [members] if layout.stacked else [members.select([p]) for p in range(len(members))]
        own = [Fit(fit(task, refit.config, datamodule, seed, group), group, device) for group in groups]
        predictors.append(Predictor.from_fits(task, refit.config, own, datamodule).to(device))
        fits += own
    total = sum(r.weight for r in refits)
    predictor = (
        predictors[0]
        if len(refits) == 1
        else Ensemble([r.weight / total for r in refits], predictors, [r.trial for r in refits])
    )
    test_inputs = datamodule.test_inputs()  # read once: the file for a table task
    scores = {}
    if datamodule.test_targets is not None:
        member_scores = []
        for f in fits:
            loader = datamodule.test_loader(f.members, f.module.net.accepts_nonzero)
            make_trainer(1).test(f.module, dataloaders=loader, verbose=False)
            member_scores += f.module.test_scores
        # the ensemble scored as one member, from its probabilities
        probabilities = predictor.averaged(test_inputs).numpy()[None]
        name = f"test_{REPORTED.get(task.metric, task.metric)}"
        scores = {
            name: float(ensemble_scores(task, probabilities, datamodule.test_targets.numpy())[0]),
            f"{name}_members": member_scores,
        }
    if predictions_path is not None:
        predictor.write_submission(test_inputs, predictions_path, datamodule.test_ids)
    return predictor.to(torch.device("cpu")), scores


def refit_metrics(scores: dict) -> dict[str, float]:
    """The refit's test figures as MLflow metrics: the ensemble's, then each member's alone."""
    metrics = {}
    for name, value in scores.items():
        if isinstance(value, list):
            metrics.update({f"{name.removesuffix('_members')}_seed{m}": v for m, v in enumerate(value)})
        else:
            metrics[name] = value
    return metrics
