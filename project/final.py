"""The end of a run: the submission from the fold models, or a refit scored once on the test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from project.cv import CVResult, fit, make_trainer, predict_members
from project.data import FoldDataModule
from project.models import StackedModule
from project.submission import write_labels, write_submission
from project.tasks import Task, TrainConfig


def house_prices_submission(result: CVResult, datamodule: FoldDataModule, path: Path) -> Path:
    """Average the K fold models' log-price predictions on test.csv: the submission is made of
    exactly the models that cross-validation scored, at no extra training cost."""
    log_prices = torch.cat([predict_members(m, datamodule) for m in result.modules]).mean(dim=0)
    return write_submission(datamodule.test_ids, np.exp(log_prices.double().numpy()), path)


def refit_and_test(task: Task, config: TrainConfig, data_dir: str | Path, seed: int,
                   predictions_path: Path | None = None) -> tuple[StackedModule, dict]:
    """Refit on every training image, ``task.ensemble`` members that differ only in their seeds,
    trained at once; then score the official test split once, with their averaged class
    probabilities (and each member alone, for comparison)."""
    datamodule = task.datamodule(data_dir=data_dir, fold=None, seed=seed, replicas=task.ensemble,
                                 **task.datamodule_kwargs)
    datamodule.prepare_data()
    datamodule.setup()
    module = fit(task, config, datamodule, seed)
    make_trainer(1).test(module, datamodule=datamodule, verbose=False)
    labels = predict_members(module, datamodule).softmax(dim=-1).mean(dim=0).argmax(dim=-1)
    accuracy = float((labels == datamodule.test_targets).double().mean())
    if predictions_path is not None:
        write_labels(labels.numpy(), predictions_path)
    return module, {"test_accuracy": accuracy, "test_accuracy_members": module.test_scores}


def test_metrics(scores: dict) -> dict[str, float]:
    """The refit's test figures as MLflow metrics: the ensemble's, then each seed's alone."""
    members = {f"test_accuracy_seed{m}": a for m, a in enumerate(scores["test_accuracy_members"])}
    return {"test_accuracy": scores["test_accuracy"], **members}


def save_model(module: StackedModule, config: TrainConfig, n_features: int, path: Path) -> Path:
    """The trained weights with what is needed to rebuild the net; loads with ``weights_only=True``."""
    torch.save({"config": config.to_dict(), "n_features": n_features, "out_features": module.net.layers[-1].out_features,
                "fold_ids": module.fold_ids, "state_dict": module.net.state_dict()}, path)
    return path


def load_model(path: Path) -> tuple[torch.nn.Module, TrainConfig, dict]:
    """Rebuild a saved net; ``weights_only=True`` so a tampered file cannot run code when loaded."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    config = TrainConfig(**saved["config"])
    net = config.build_net(saved["n_features"], saved["out_features"], members=len(saved["fold_ids"]))
    net.load_state_dict(saved["state_dict"])
    return net.eval(), config, saved
