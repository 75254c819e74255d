"""Any nn.Module on any data kind under the default layout: one that keeps running statistics
(BatchNorm), one that torch.func.vmap refuses, one with buffers, on dense and one-hot tables, IDX
and image folders; and a model that raises makes failed trials, not a dead sweep."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch

from project.artifacts.predictor import Predictor
from project.config import TrainConfig
from project.cv import cross_validate
from project.data import batches
from project.tasks import Task, get_task
from project.validate import load_preset
from tests.conftest import make_house_frames, write_idx_set, write_sklearn_csvs
from tests.test_presets import SHAPES, write_image_folders

REPO = Path(__file__).resolve().parents[1]


LAYOUTS = {
    "own-batchnorm-mlp": "sequential (torch.func vmap; BatchNorm1d at 'body.2' keeps running statistics",
    "own-guarded-mlp": "sequential (torch.func vmap; torch.func.vmap refused it: ",
    "own-buffered-mlp": "stacked (torch.func vmap; stacked by default)",
}

DENSE = """\
name: concavity
kind: regression
metric: rmse
folds: 2
data: {kind: csv, dataset: concavity, id: id, target: worst_concavity, target_transform: log1p}
models: {mlp: {}}
"""


def task_and_data(kind: str, tmp_path: Path) -> tuple[Task, object]:
    """A task of the data kind, on a small data set in its real file format, and its two folds set up."""
    if kind == "csv-one-hot":  # House Prices' columns, its categories one-hot encoded
        train, test = make_house_frames(n_train=80)
        (tmp_path / "house-prices").mkdir()
        train.to_csv(tmp_path / "house-prices" / "train.csv", index=False)
        test.to_csv(tmp_path / "house-prices" / "test.csv", index=False)
        task = get_task("house-prices")
    elif kind == "csv-dense":
        write_sklearn_csvs(tmp_path / "concavity", "concavity")
        (tmp_path / "concavity.yaml").write_text(DENSE)
        task = Task(load_preset(tmp_path / "concavity.yaml"))
    elif kind == "idx":
        write_idx_set(tmp_path / "fashion-mnist", n_train=80, n_test=20)
        task = get_task("fashion-mnist")
    else:
        write_image_folders(tmp_path / "shapes")
        (tmp_path / "shapes.yaml").write_text(SHAPES)
        task = Task(load_preset(tmp_path / "shapes.yaml"))
    dm = task.datamodule(tmp_path, n_folds=2, fold=[0, 1])
    dm.setup()  # no prepare_data(): the shipped tasks' pinned checksums are the real files'
    return task, dm


@pytest.mark.parametrize("kind", ["csv-one-hot", "csv-dense", "idx", "image-folder"])
@pytest.mark.parametrize("model", list(LAYOUTS))
def test_any_module_cross_validates_and_predicts_on_any_data_kind(tmp_path, monkeypatch, own_models, kind, model):
    # table rows of any density travel with their nonzero entries, as one-hot ones do: the path on
    # which a model of one's own must not be stacked to see whether its first layer could use them
    monkeypatch.setattr(batches, "SPARSE_DENSITY", 1.0)
    task, dm = task_and_data(kind, tmp_path)
    if kind.startswith("csv"):
        assert dm.members.features.nonzero is not None
    config = TrainConfig(model=model, model_kwargs={"width": 16}, max_epochs=1, batch_size=16, lr=1e-2)
    result = cross_validate(task, config, datamodule=dm)
    assert result.layout.startswith(LAYOUTS[model]), result.layout
    assert len(result.fold_scores) == 2 and all(math.isfinite(s) for s in result.fold_scores)
    predicted = Predictor.from_fits(task, config, result.fits, dm).averaged(dm.test_inputs())
    assert len(predicted) == dm.test_size and torch.isfinite(predicted).all()


OWN_MODELS = """\
import math

import torch
from torch import nn

from project.models import register_model


def body(in_shape, out_features, norm, width):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(in_shape), width), norm, nn.ReLU(), nn.Linear(width, out_features)
    )


@register_model("own-batchnorm-mlp")
class BatchNormMLP(nn.Module):
    def __init__(self, in_shape, out_features, width: int = 32):
        super().__init__()
        self.body = body(in_shape, out_features, nn.BatchNorm1d(width), width)

    def forward(self, x):
        return self.body(x)


@register_model("own-guarded-mlp")
class GuardedMLP(nn.Module):
    def __init__(self, in_shape, out_features, width: int = 32):
        super().__init__()
        self.body = body(in_shape, out_features, nn.LayerNorm(width), width)

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        return self.body(x)


@register_model("own-buffered-mlp")
class BufferedMLP(nn.Module):
    # a fixed gain kept as a buffer beside the parameters

    def __init__(self, in_shape, out_features, width: int = 32):
        super().__init__()
        self.body = body(in_shape, out_features, nn.Identity(), width)
        self.register_buffer("gain", torch.full((out_features,), 0.5))

    def forward(self, x):
        return self.body(x) * self.gain


@register_model("own-broken-mlp")
class BrokenMLP(nn.Module):
    def __init__(self, in_shape, out_features, width: int = 32):
        super().__init__()
        self.body = body(in_shape, out_features, nn.Identity(), width)

    def forward(self, x):
        raise RuntimeError(f"forward of a model under construction got {tuple(x.shape)}")
"""


@pytest.fixture(scope="module")
def own_models(tmp_path_factory) -> None:
    """The file above, imported from a folder outside the package: its models registered here."""
    folder = tmp_path_factory.mktemp("project-of-mine")
    (folder / "models_of_someone.py").write_text(OWN_MODELS)
    sys.path.insert(0, str(folder))
    importlib.import_module("models_of_someone")


OWN_PRESET = """\
extends: house-prices
imports: [models_of_someone]
model: {model}
models:
  {model}:
    args: {{width: 32}}
    train: {{batch_size: 128, max_epochs: 4, lr: 3.0e-3}}
    search:
      lr: {{low: 1.0e-3, high: 1.0e-2, log: true}}
    start: {{lr: 3.0e-3}}
sweep: {{trials: 2, jobs: 1}}
"""


def own_project(tmp_path: Path, model: str) -> list[str]:
    """A preset copied from House Prices' that names a model in a file outside the package; the
    flags that point the entry points at it and at folders of the test's own."""
    mine = tmp_path / "project-of-mine"
    mine.mkdir()
    (mine / "models_of_someone.py").write_text(OWN_MODELS)
    (mine / "preset.yaml").write_text(OWN_PRESET.format(model=model))
    return ["--config", str(mine / "preset.yaml"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, str(REPO / "experiments" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "why"),
    [("own-batchnorm-mlp", "keeps running statistics"), ("own-guarded-mlp", "torch.func.vmap refused it")],
)
def test_a_model_that_cannot_be_stacked_trains_sweeps_and_submits_house_prices(tmp_path, real_data, model, why):
    """The real House Prices columns (one-hot heavy), 5 folds, the default layout: the folds train one
    after another and say why, and both entry points write Kaggle's submission."""
    args = own_project(tmp_path, model)
    trained = run_script("train.py", [*args, "--output-dir", str(tmp_path / "train")], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["fold_layout"].startswith("sequential") and why in summary["fold_layout"]
    assert len(summary["fold_scores"]) == 5 and summary["cv_mean"] < 1.0
    submission = pd.read_csv(tmp_path / "train" / "submission.csv")
    assert list(submission.columns) == ["Id", "SalePrice"] and len(submission) == 1459

    swept = run_script("sweep.py", [*args, "--output-dir", str(tmp_path / "sweep")], tmp_path)
    assert swept.returncode == 0, swept.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert summary["n_complete"] == 2 and summary["n_failed"] == 0
    submission = pd.read_csv(summary["submission"])
    assert submission["Id"].tolist() == list(range(1461, 2920)) and (submission["SalePrice"] > 0).all()


@pytest.mark.slow
def test_trials_whose_model_raises_fail_one_by_one_and_the_sweep_ends_in_one_line(tmp_path, real_data):
    """Four trials on two workers: each trial FAIL with its error recorded (Optuna and MLflow), both
    workers alive to the end, and one line that names the first failure, exit 1, no traceback."""
    args = [*own_project(tmp_path, "own-broken-mlp"), "--output-dir", str(tmp_path / "out")]
    swept = run_script("sweep.py", [*args, "--n-trials", "4", "--n-jobs", "2"], tmp_path)
    assert swept.returncode == 1, swept.stderr[-3000:]
    error = "RuntimeError: forward of a model under construction got "
    assert "Traceback" not in swept.stderr and "exited" not in swept.stderr, swept.stderr[-3000:]
    errors = [line for line in swept.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: no trial completed: trial 0 failed: {error}"), errors

    study = optuna.load_study(study_name="house-prices", storage=f"sqlite:///{tmp_path / 'out' / 'optuna.db'}")
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL] * 4
    assert all(t.user_attrs["failure"].startswith(error) for t in trials)
    workers = [t.user_attrs["worker"]["pid"] for t in trials]
    assert sorted(workers.count(pid) for pid in set(workers)) == [2, 2]  # each worker ran its two trials

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("house-prices").experiment_id], "tags.state = 'FAIL'")
    assert len(runs) == 4 and all(r.data.tags["failure"].startswith(error) for r in runs)
    assert "traceback.txt" in [a.path for a in client.list_artifacts(runs[0].info.run_id)]
