"""The K-fold runner on the real configuration shrunk: seeds, divergence, refits, models of one's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from project.artifacts.predictor import Ensemble, Predictor, load_predictor
from project.artifacts.refit import Refit, refit_and_test, refit_metrics
from project.config import PresetError, TrainConfig, preset_path
from project.cv import TrainingDiverged, build_module, cross_validate
from project.data import IdxDataModule
from project.data.base import EVAL_ELEMENTS
from project.models import register_model
from project.tasks import Task, get_task
from project.validate import load_preset
from tests.conftest import house_task_dm, write_idx_set

SMALL_MLP = {"hidden_sizes": (8,)}


@register_model("test-tiny-convnet")
class TinyConvNet(nn.Module):
    """What a user writes: an ordinary batch-first module, defined outside the package."""

    def __init__(self, in_shape, out_features, channels: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[0], channels, 3, padding=1),
            nn.GroupNorm(2, channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(channels * 16, out_features),
        )

    def forward(self, x):
        return self.body(x)


@register_model("test-batchnorm-convnet")
class BatchNormConvNet(nn.Module):
    """The most common kind of CNN: BatchNorm with running statistics, which vmap cannot stack."""

    def __init__(self, in_shape, out_features, channels: int = 4) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_shape[0], channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(channels * 16, out_features),
        )

    def forward(self, x):
        return self.body(x)


def test_a_batchnorm_cnn_cross_validates_under_auto_and_says_its_layout(idx_dir):
    task = get_task("fashion-mnist")
    dm = task.datamodule(data_dir=idx_dir, n_folds=2, fold=[0, 1])
    dm.setup()
    config = TrainConfig(model="test-batchnorm-convnet", max_epochs=2, batch_size=32, lr=1e-2)
    result = cross_validate(task, config, datamodule=dm)
    assert len(result.fold_scores) == 2 and all(0 <= s <= 1 for s in result.fold_scores)
    assert result.layout == (
        "sequential (torch.func vmap; BatchNorm2d at 'body.1' keeps running statistics, which stacking cannot batch)"
    )


@register_model("test-tiny-regressor")
class TinyRegressor(nn.Module):
    def __init__(self, in_shape, out_features, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_shape[0], width), nn.Tanh(), nn.Linear(width, out_features))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("stacking", ["auto", "vmap", "sequential"])
def test_a_model_of_ones_own_cross_validates_with_no_change_to_the_package(idx_dir, stacking):
    task = get_task("fashion-mnist")
    dm = task.datamodule(data_dir=idx_dir, n_folds=2, fold=[0, 1])
    dm.setup()
    config = TrainConfig(model="test-tiny-convnet", model_kwargs={"channels": 6}, max_epochs=2, batch_size=32, lr=1e-2)
    result = cross_validate(task, config, datamodule=dm, stacking=stacking)
    assert len(result.fold_scores) == 2 and all(0 <= s <= 1 for s in result.fold_scores)
    assert "torch.func vmap" in result.layout
    assert len(result.history[0]) == 2 and {"train_loss", "val_acc"} <= set(result.history[0][0])


def test_a_regression_model_of_ones_own_starts_from_the_training_mean(house_dir):
    task, dm = house_task_dm(house_dir)
    result = cross_validate(
        task, TrainConfig(model="test-tiny-regressor", max_epochs=3, batch_size=16, lr=1e-2), datamodule=dm
    )
    assert len(result.fold_scores) == 3 and all(0 < s < 1 for s in result.fold_scores)  # log prices are ~12


def test_epoch_metrics_reach_lightning_callbacks_without_a_logger(house_dir):
    """EarlyStopping reads val/rmse from callback_metrics: here it stops after the first epoch."""
    from lightning.pytorch.callbacks import EarlyStopping

    task, dm = house_task_dm(house_dir)
    stop = EarlyStopping(monitor="val/rmse", stopping_threshold=100.0)
    result = cross_validate(task, TrainConfig(model_kwargs=SMALL_MLP, max_epochs=5), datamodule=dm, callbacks=[stop])
    assert len(result.history[0]) == 1 and stop.stopped_epoch == 0


def test_member_initialisation_does_not_depend_on_its_neighbours(house_dir):
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs=SMALL_MLP)
    stacked = build_module(task, config, dm, dm.members, seed=2).net.member_state_dict()
    alone = build_module(task, config, dm, dm.members.select([2]), seed=2).net.member_state_dict()
    for name, value in alone.items():
        torch.testing.assert_close(stacked[name][2:], value)
    assert not torch.equal(stacked["layers.1.weight"][0], stacked["layers.1.weight"][1])


def test_refit_ensemble_scores_averaged_probabilities(tmp_path):
    """The final refit trains the task's ensemble of seeds and scores their average once."""
    assert get_task("fashion-mnist").seeds == 3
    write_idx_set(tmp_path / "tiny-images")
    task = Task(load_preset(preset_path("fashion-mnist"), ["data.dataset=tiny-images"]))  # no pinned checksums
    config = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, max_epochs=2, batch_size=32)
    predictor, scores = refit_and_test(
        task, [Refit(config, seeds=3)], tmp_path, seed=0, predictions_path=tmp_path / "p.csv"
    )
    weights = predictor.stack.member_state_dict()["layers.1.weight"]
    assert weights.shape[0] == 3 and not torch.equal(weights[0], weights[1])  # own initialisation each
    assert len(scores["test_accuracy_members"]) == 3 and 0 <= scores["test_accuracy"] <= 1
    assert list(refit_metrics(scores)) == [
        "test_accuracy",
        "test_accuracy_seed0",
        "test_accuracy_seed1",
        "test_accuracy_seed2",
    ]
    dm = task.datamodule(tmp_path, fold=None, replicas=3)
    dm.setup()
    with torch.no_grad():
        logits = predictor.head(
            predictor.stack(dm.members.test_features.gather(torch.arange(dm.test_size).expand(3, -1)))
        )
    expected = (logits.softmax(-1).mean(0).argmax(-1) == dm.test_targets).double().mean().item()
    assert scores["test_accuracy"] == pytest.approx(expected)
    labels = (tmp_path / "p.csv").read_text().splitlines()
    assert labels[0] == "id,label" and len(labels) == dm.test_size + 1
    # saved and reloaded, it predicts from raw pixels ([N, 1, 28, 28] uint8) what it wrote
    pixels = dm.test_inputs()
    assert pixels.dtype == np.uint8 and pixels.shape == (dm.test_size, 1, 28, 28)
    reloaded = Predictor.load(predictor.save(tmp_path / "model"))
    frame = reloaded.predict(pixels)
    assert frame.to_csv(index=False).splitlines() == labels
    probabilities = torch.from_numpy(reloaded.averaged(pixels).numpy())
    torch.testing.assert_close(probabilities, logits.softmax(-1).mean(0), rtol=1e-5, atol=1e-6)


def test_same_seed_same_cv_score(house_dir):
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs={"hidden_sizes": (16,), "dropout": 0.3}, max_epochs=3, batch_size=8)
    first = cross_validate(task, config, datamodule=dm, seed=0)
    second = cross_validate(task, config, datamodule=dm, seed=0)
    assert len(first.fold_scores) == 3 and all(s > 0 for s in first.fold_scores)
    assert abs(first.mean - second.mean) < 1e-6
    assert len(first.history[0]) == 3 and {"train_loss", "val_rmse"} <= set(first.history[0][0])


def test_divergence_names_fold_and_epoch(house_dir):
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, max_epochs=50, batch_size=8, lr=1e4, optimizer="sgd")
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite on fold \d at epoch \d+"):
        cross_validate(task, config, datamodule=dm)


def test_classification_cv(idx_dir):
    task = get_task("fashion-mnist")
    dm = task.datamodule(data_dir=idx_dir, n_folds=2, fold=[0, 1], batch_size=32)
    dm.setup()
    result = cross_validate(
        task, TrainConfig(model_kwargs={"hidden_sizes": (32,)}, max_epochs=2, batch_size=32), datamodule=dm
    )
    assert len(result.fold_scores) == 2 and all(0 <= s <= 1 for s in result.fold_scores)


def test_single_member_scores_stay_lists(house_dir):
    """One member (one validation fold, or sequential folds) keeps per-member lists in the history."""
    task, dm = house_task_dm(house_dir)
    result = cross_validate(
        task, TrainConfig(model_kwargs=SMALL_MLP, max_epochs=2, batch_size=16), datamodule=dm, stacking="sequential"
    )
    assert len(result.fold_scores) == 3 and all(isinstance(s, float) for s in result.fold_scores)
    assert all(isinstance(r["val_rmse"], float) for h in result.history for r in h)
    # the module's own record keeps one value per member, as the pruning callback reads it
    assert [len(r["val_rmse"]) for r in result.fits[0].module.history] == [1, 1]
    assert [len(r["train_loss"]) for r in result.fits[0].module.history] == [1, 1]


def test_a_refit_of_several_configurations_scores_their_weighted_average(tmp_path):
    """The study's ensemble on a task that refits: each selected configuration refitted once, the test
    split scored with their weighted probabilities."""
    write_idx_set(tmp_path / "tiny-images")
    task = Task(load_preset(preset_path("fashion-mnist"), ["data.dataset=tiny-images"]))
    narrow = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, max_epochs=2, batch_size=32)
    wide = TrainConfig(model_kwargs={"hidden_sizes": (32, 32)}, max_epochs=3, batch_size=64, lr=3e-3)
    refits = [Refit(narrow, weight=0.6, trial=4), Refit(wide, weight=0.2, trial=1)]
    predictor, scores = refit_and_test(task, refits, tmp_path, seed=0, predictions_path=tmp_path / "p.csv")
    assert isinstance(predictor, Ensemble) and predictor.weights == pytest.approx([0.75, 0.25])
    assert predictor.members == [4, 1] and len(scores["test_accuracy_members"]) == 2
    dm = task.datamodule(tmp_path, fold=None, replicas=2)
    dm.setup()
    pixels = dm.test_inputs()
    each = [p.averaged(pixels) for p in predictor.predictors]
    expected = 0.75 * each[0] + 0.25 * each[1]
    assert scores["test_accuracy"] == pytest.approx((expected.argmax(-1) == dm.test_targets).double().mean().item())
    alone = [(e.argmax(-1) == dm.test_targets).double().mean().item() for e in each]
    assert scores["test_accuracy_members"] == pytest.approx(alone)
    reloaded = load_predictor(predictor.save(tmp_path / "model"))
    torch.testing.assert_close(reloaded.averaged(pixels), expected, rtol=1e-5, atol=1e-6)
    assert reloaded.predict(pixels).to_csv(index=False).splitlines() == (tmp_path / "p.csv").read_text().splitlines()


def test_evaluation_passes_are_cut_to_the_sample_size_and_score_the_same(tmp_path):
    """Images are evaluated a few hundred at a time (tables in one pass of up to 4096 rows); the
    size of a pass changes nothing in the scores."""
    write_idx_set(tmp_path / "fashion-mnist", n_train=800)  # validation folds of 400 images
    task = get_task("fashion-mnist")
    config = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, max_epochs=2, batch_size=32)
    scores = []
    for eval_batch_size in (4096, 7):
        dm = IdxDataModule(
            dataset="fashion-mnist",
            data_dir=tmp_path,
            n_folds=2,
            fold=[0, 1],
            eval_batch_size=eval_batch_size,
            stratified=True,
        )
        dm.setup()
        scores.append(cross_validate(task, config, datamodule=dm).fold_scores)
        assert dm.eval_rows == min(eval_batch_size, EVAL_ELEMENTS // (28 * 28))
        assert len(dm.val_loader()) == (2 if eval_batch_size == 4096 else 58)
    assert scores[0] == scores[1]


@pytest.mark.parametrize(
    ("flag", "enabled", "warn_only"), [("true", True, False), ("warn", True, True), ("false", False, False)]
)
def test_the_deterministic_setting_reaches_the_trainer_from_the_flag_or_the_preset(house_dir, flag, enabled, warn_only):
    """``--deterministic`` (or the preset's ``deterministic``) is what torch runs the fit under."""
    import argparse

    import lightning as L

    from project.cli import add_common_arguments, load_task

    parser = argparse.ArgumentParser()
    add_common_arguments(parser)
    task, _ = load_task(
        parser.parse_args(["--data-dir", str(house_dir), "--folds", "2", "--deterministic", flag]), parser
    )
    assert task.preset.deterministic == {"true": True, "false": False}.get(flag, flag)
    seen = []

    class Probe(L.Callback):
        def on_train_start(self, trainer, module):
            seen.append(
                (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
            )

    dm = task.datamodule(data_dir=house_dir, n_folds=2, fold=[0, 1])
    dm.setup()
    cross_validate(task, TrainConfig(max_epochs=1), datamodule=dm, callbacks=[Probe()])
    assert seen and set(seen) == {(enabled, warn_only)}


def test_a_deterministic_setting_that_is_not_one_is_refused_naming_the_key(tmp_path):
    with pytest.raises(PresetError, match=r"key 'deterministic': 'sometimes', expected true, warn or false"):
        load_preset(preset_path("house-prices"), ["deterministic=sometimes"])
