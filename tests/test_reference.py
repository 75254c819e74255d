"""The plain way and the engine agree: a LightningModule of a few dozen lines, trained with a plain
Trainer on a DataModule's standard ``(x, y)`` batches for one fold, scores that fold as the
engine's fold-stacked fit of the same configuration does."""

from __future__ import annotations

import statistics

import lightning as L
import pytest
import torch
from torch import nn

from project.config import TrainConfig
from project.cv import cross_validate
from project.models import create_model
from project.reference import PlainModule
from project.tasks import get_task

CONFIG = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, lr=1e-2, weight_decay=1e-4, batch_size=16, max_epochs=30)


class LossPerBatch(L.LightningModule):
    """A LightningModule a user writes, unaware of folds: ``x, y = batch``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.net = nn.Linear(features, 1)
        self.shapes: list[tuple] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.shapes.append((tuple(x.shape), tuple(y.shape)))
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y - 12.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def test_a_plain_lightningmodule_trains_on_a_folds_standard_batches(house_dir):
    dm = get_task("house-prices").datamodule(house_dir, n_folds=3, fold=0, batch_size=16)
    dm.setup()  # the fixture's rows are not the pinned data set, which prepare_data would fetch
    module = LossPerBatch(dm.n_features)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0
    )
    trainer.fit(module, dm)
    assert module.shapes == [((16, dm.n_features), (16,)), ((16, dm.n_features), (16,)), ((8, dm.n_features), (8,))]
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (20, dm.n_features) and y.dtype == torch.float32
    assert next(iter(dm.predict_dataloader())).shape == (dm.test_size, dm.n_features)
    stacked = get_task("house-prices").datamodule(house_dir, n_folds=3, fold=[0, 1, 2])
    stacked.setup()
    with pytest.raises(ValueError, match=r"the standard loaders serve one fold, and this TableDataModule holds 3"):
        stacked.train_dataloader()


def plain_fold_score(house_dir, seed: int) -> float:
    task = get_task("house-prices")
    dm = task.datamodule(house_dir, n_folds=3, fold=0, batch_size=CONFIG.batch_size)
    dm.setup()
    L.seed_everything(seed, verbose=False)
    net = create_model("mlp", dm.sample_shape, 1, **CONFIG.model_kwargs)
    offset = float(dm.targets[dm.members.train_rows[0]].mean())
    module = PlainModule(net, offset=offset, lr=CONFIG.lr, weight_decay=CONFIG.weight_decay)
    trainer = L.Trainer(
        max_epochs=CONFIG.max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    return float(trainer.callback_metrics["val/metric"])


def engine_fold_score(house_dir, seed: int) -> float:
    task = get_task("house-prices")
    dm = task.datamodule(house_dir, n_folds=3, fold=[0])
    dm.setup()
    return cross_validate(task, CONFIG, datamodule=dm, seed=seed).fold_scores[0]


@pytest.mark.slow
def test_the_reference_module_scores_a_fold_as_the_engine_does(house_dir):
    """The random streams cannot agree (the engine draws its batches and dropout masks for K
    members at once), so the two are compared over seeds: their mean fold-0 RMSEs differ by less
    than three standard errors of the difference."""
    seeds = range(6)
    plain = [plain_fold_score(house_dir, s) for s in seeds]
    engine = [engine_fold_score(house_dir, s) for s in seeds]
    spread = (statistics.variance(plain) / len(plain) + statistics.variance(engine) / len(engine)) ** 0.5
    print(f"plain {statistics.mean(plain):.4f}, engine {statistics.mean(engine):.4f}, spread {spread:.4f}")
    assert abs(statistics.mean(plain) - statistics.mean(engine)) < 3 * spread, (plain, engine)
    dm = get_task("house-prices").datamodule(house_dir, n_folds=3, fold=0)
    dm.setup()
    val = dm.targets[dm.members.val_rows[0]]
    mean_only = float((val - dm.targets[dm.members.train_rows[0]].mean()).square().mean().sqrt())
    assert max(statistics.mean(plain), statistics.mean(engine)) < 0.8 * mean_only  # both learnt something


def test_an_image_folds_standard_batches_are_batch_first_images(idx_dir):
    dm = get_task("fashion-mnist").datamodule(idx_dir, n_folds=2, fold=1, batch_size=8)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,) and y.dtype == torch.int64
    x, y = next(iter(dm.test_dataloader()))  # the official test split is labelled
    assert x.shape[1:] == (1, 28, 28) and len(y) == len(x)
