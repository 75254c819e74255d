"""The end of a task that refits (``final.refit`` in its preset, the image tasks): train on every
training row, then score the test split once, where it has labels."""

from __future__ import annotations

from pathlib import Path

import torch

from project.cv import Fit, fit, fold_layout, make_trainer
from project.predictor import Predictor
from project.tasks import Task, TrainConfig

REPORTED = {"acc": "accuracy"}  # the name a metric is reported under, where it is not its own


def refit_and_test(task: Task, config: TrainConfig, data_dir: str | Path, seed: int,
                   predictions_path: Path | None = None) -> tuple[Predictor, dict]:
    """Refit on every training row, ``task.ensemble`` members that differ only in their seeds
    (stacked or one after another, as the engine measured faster); then score the test split
    once, with their averaged class probabilities (and each member alone, for comparison), and
    write the predictions."""
    datamodule = task.datamodule(data_dir, fold=None, seed=seed, replicas=task.ensemble)
    datamodule.prepare_data()
    datamodule.setup()
    members = datamodule.members
    layout = fold_layout(task, config, datamodule, len(members), seed)
    groups = [members] if layout.stacked else [members.select([p]) for p in range(len(members))]
    fits = [Fit(fit(task, config, datamodule, seed, group), group) for group in groups]
    predictor = Predictor.from_fits(task, config, fits, datamodule)
    test_inputs = datamodule.test_inputs()  # read once: the file for a table task
    scores = {}
    if datamodule.test_targets is not None:
        member_scores = []
        for f in fits:
            loader = datamodule.test_loader(f.members, f.module.net.accepts_nonzero)
            make_trainer(1).test(f.module, dataloaders=loader, verbose=False)
            member_scores += f.module.test_scores
        metric = fits[0].module.head.metric()  # the ensemble scored as one member, from its probabilities
        probabilities = predictor.averaged(test_inputs)
        metric.update(probabilities.log()[None], datamodule.test_targets[None], torch.ones(1, len(probabilities)))
        name = f"test_{REPORTED.get(task.metric, task.metric)}"
        scores = {name: float(metric.compute()[0]), f"{name}_members": member_scores}
    if predictions_path is not None:
        predictor.write_submission(test_inputs, predictions_path, datamodule.test_ids)
    return predictor, scores


def refit_metrics(scores: dict) -> dict[str, float]:
    """The refit's test figures as MLflow metrics: the ensemble's, then each seed's alone."""
    metrics = {}
    for name, value in scores.items():
        if isinstance(value, list):
            metrics.update({f"{name.removesuffix('_members')}_seed{m}": v for m, v in enumerate(value)})
        else:
            metrics[name] = value
    return metrics
