"""The end of an image task: refit on every training image, then score the test split once."""

from __future__ import annotations

from pathlib import Path

import torch

from project.cv import Fit, fit, fold_layout, make_trainer, predict_members
from project.submission import write_labels
from project.tasks import Task, TrainConfig


def refit_and_test(task: Task, config: TrainConfig, data_dir: str | Path, seed: int,
                   predictions_path: Path | None = None) -> tuple[list[Fit], dict]:
    """Refit on every training image, ``task.ensemble`` members that differ only in their seeds
    (stacked or one after another, as the engine measured faster); then score the official test
    split once, with their averaged class probabilities (and each member alone, for comparison)."""
    datamodule = task.datamodule(data_dir=data_dir, fold=None, seed=seed, replicas=task.ensemble,
                                 **task.datamodule_kwargs)
    datamodule.prepare_data()
    datamodule.setup()
    members = datamodule.members
    layout = fold_layout(task, config, datamodule, len(members), seed)
    groups = [members] if layout.stacked else [members.select([p]) for p in range(len(members))]
    fits = [Fit(fit(task, config, datamodule, seed, group), group) for group in groups]
    member_scores = []
    for f in fits:
        make_trainer(1).test(f.module, dataloaders=datamodule.test_loader(f.members, f.module.net.accepts_nonzero),
                             verbose=False)
        member_scores += f.module.test_scores
    logits = torch.cat([predict_members(f.module, datamodule, f.members) for f in fits])
    labels = logits.softmax(dim=-1).mean(dim=0).argmax(dim=-1)
    accuracy = float((labels == datamodule.test_targets).double().mean())
    if predictions_path is not None:
        write_labels(labels.numpy(), predictions_path)
    return fits, {"test_accuracy": accuracy, "test_accuracy_members": member_scores}


def refit_metrics(scores: dict) -> dict[str, float]:
    """The refit's test figures as MLflow metrics: the ensemble's, then each seed's alone."""
    members = {f"test_accuracy_seed{m}": a for m, a in enumerate(scores["test_accuracy_members"])}
    return {"test_accuracy": scores["test_accuracy"], **members}
