"""The GPU check: ``make gpu-check`` on a machine with a CUDA GPU, in a few minutes; skipped elsewhere.

Fold scores on the GPU are compared with the CPU's within ``GPU_TOLERANCE``: the same seeds draw
the same initial weights and batches, but float32 kernels sum in another order, and twenty epochs
carry those differences into the last digits of a fold's RMSE.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from project.artifacts.predictor import load_predictor
from project.artifacts.refit import Refit, refit_and_test
from project.config import TrainConfig, preset_path
from project.cv import cross_validate
from project.sweep.recovery import WORKER_ATTR
from project.tasks import Task
from project.validate import load_preset
from tests.conftest import house_task_dm, write_idx_set
from tests.test_reliability import REPO, SWEEP, sweep_args, trials

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the GPU check runs where one is")
ACCEL = "gpu"  # what the check trains on ("cpu" runs its code on a machine without one)
GPU_TOLERANCE = 2e-3  # absolute, on a fold's RMSE(log) of about 0.13


@pytest.mark.parametrize("stacking", ["auto", "vmap", "sequential"])
def test_house_prices_folds_score_on_the_gpu_as_on_the_cpu(real_data, stacking):
    task, dm = house_task_dm(real_data, folds=5)
    config = TrainConfig(
        model_kwargs={"hidden_sizes": (64,), "dropout": 0.0},
        max_epochs=20,
        lr=1e-2,
        optimizer="sgd",
        scheduler="cosine",
        weight_decay=1e-3,
        batch_size=64,
    )
    gpu = cross_validate(task, config, stacking=stacking, datamodule=dm, accelerator=ACCEL)
    cpu = cross_validate(task, config, stacking=stacking, datamodule=dm, accelerator="cpu")
    assert all(f.device.type == ("cuda" if ACCEL == "gpu" else "cpu") for f in gpu.fits)
    np.testing.assert_allclose(gpu.fold_scores, cpu.fold_scores, atol=GPU_TOLERANCE)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_on_the_gpu(real_data, precision):
    task, dm = house_task_dm(real_data, folds=3)
    config = TrainConfig(
        model_kwargs={"hidden_sizes": (64,)}, max_epochs=10, precision=precision, gradient_clip_val=1.0
    )
    result = cross_validate(task, config, datamodule=dm, accelerator=ACCEL)
    assert np.isfinite(result.fold_scores).all() and max(result.fold_scores) < 0.5


def test_the_cnn_measures_its_layout_on_the_gpu_and_refits_and_reloads(tmp_path):
    write_idx_set(tmp_path / "tiny-images", n_train=600, n_test=100)
    # adaptive pooling's CUDA backward has no deterministic kernel: warn, not fail; benchmark: the
    # layout is timed where the fit trains (by default a rule chooses it)
    overrides = ["data.dataset=tiny-images", "deterministic=warn", "benchmark=true"]
    task = Task(load_preset(preset_path("fashion-mnist"), overrides))
    dm = task.datamodule(data_dir=tmp_path, n_folds=3, fold=[0, 1, 2])
    dm.setup()
    # GroupNorm: a net whose folds may stack (BatchNorm's train one after another, by rule, untimed)
    config = task.config("cnn", max_epochs=1, model_kwargs={"norm": "group"})
    result = cross_validate(task, config, datamodule=dm, accelerator=ACCEL)
    assert f"benchmark: measured on {'cuda' if ACCEL == 'gpu' else 'cpu'}" in result.layout, result.layout
    predictor, scores = refit_and_test(task, [Refit(config, seeds=2)], tmp_path, 0, tmp_path / "predictions.csv")
    assert 0 <= scores["test_accuracy"] <= 1
    images = dm.test_inputs()
    reloaded = load_predictor(predictor.save(tmp_path / "model"))
    np.testing.assert_allclose(reloaded.averaged(images).numpy(), predictor.averaged(images).numpy(), atol=1e-5)


def test_two_workers_of_a_sweep_train_on_the_gpu(real_data, tmp_path):
    args = sweep_args(real_data, tmp_path, "--n-trials", "4", "--n-jobs", "2", "--no-pruning", "--ensemble", "trials")
    sweep = subprocess.run([*SWEEP, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    done = [t for t in trials(f"sqlite:///{tmp_path / 'out' / 'optuna.db'}") if t.state.name == "COMPLETE"]
    assert len({json.dumps(t.user_attrs[WORKER_ATTR], sort_keys=True) for t in done}) == 2  # both finished trials
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("house-prices").experiment_id])
    devices = {r.data.tags["device"] for r in runs if "trial_number" in r.data.tags}
    assert devices and all(d.startswith("cuda" if ACCEL == "gpu" else "cpu") for d in devices), devices
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(pd.read_csv(summary["submission"])) == 1459
    print(json.dumps({"devices": sorted(devices), "cv": summary["cv_mean"]}), file=sys.stderr)
