"""A model of one's own, in a file outside the package, named by a preset's imports: it sweeps to a
submission, and its saved model and registered MLflow Model carry that file with them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from project.models import create_model
from project.tasks import Task
from project.validate import load_preset
from tests.conftest import write_sklearn_csvs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import sweep  # noqa: E402

OWN_MODELS = '''\
from torch import nn

from project.models import register_model


@register_model("own-net")
class OwnNet(nn.Module):
    """Someone's own model, in a file of their own."""

    def __init__(self, in_shape, out_features, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_shape[-1], width), nn.Tanh(), nn.Linear(width, out_features))

    def forward(self, x):
        return self.body(x)
'''

PRESET = """\
name: own-concavity
kind: regression
metric: rmse
folds: 3
imports: [own_models_of_a_user]
data: {kind: csv, dataset: concavity, id: id, target: worst_concavity, target_transform: log1p}
model: own-net
models:
  own-net:
    args: {width: 16}
    train: {batch_size: 32, max_epochs: 15, lr: 3.0e-3}
    search:
      model.width: {low: 8, high: 32, log: true}
    start: {width: 16}
sweep: {trials: 2, jobs: 1}
"""


def sweep_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(tmp_path / "project-of-mine" / "preset.yaml"),
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "out"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


@pytest.mark.slow
def test_a_model_from_a_file_of_ones_own_sweeps_and_serves_from_elsewhere(tmp_path):
    mine = tmp_path / "project-of-mine"
    mine.mkdir()
    (mine / "own_models_of_a_user.py").write_text(OWN_MODELS)
    (mine / "preset.yaml").write_text(PRESET)
    held_out = write_sklearn_csvs(tmp_path / "data" / "concavity", "concavity")
    assert sweep.main(sweep_args(tmp_path)) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["n_complete"] == 2 and summary["best_params"]["width"] in range(8, 33)
    submission = pd.read_csv(summary["submission"])
    assert submission["id"].tolist() == held_out.index.tolist()
    assert (tmp_path / "out" / "model" / "code" / "own_models_of_a_user.py").is_file() or any(
        (tmp_path / "out" / "model").glob("*/code/own_models_of_a_user.py")
    )

    # the file is gone from where it was written: only the copy the model carries can be imported
    (mine / "own_models_of_a_user.py").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    test_rows = tmp_path / "data" / "concavity" / "test.csv"
    script = (
        "import mlflow, pandas as pd, sys\n"
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'mlflow.db'}')\n"
        "model = mlflow.pyfunc.load_model('models:/own-concavity/latest')\n"
        f"rows = model.predict(pd.read_csv('{test_rows}'))\n"
        "print(rows.to_json(orient='records'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    served = subprocess.run(
        [sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 0, served.stderr[-3000:]
    predicted = pd.DataFrame(json.loads(served.stdout.strip().splitlines()[-1]))
    pd.testing.assert_frame_equal(predicted, submission, check_dtype=False, rtol=1e-5)


def test_an_unknown_model_names_the_registered_ones(tmp_path, capsys):
    mine = tmp_path / "project-of-mine"
    mine.mkdir()
    (mine / "own_models_of_a_user.py").write_text(OWN_MODELS)
    (mine / "preset.yaml").write_text(PRESET)
    write_sklearn_csvs(tmp_path / "data" / "concavity", "concavity")
    with pytest.raises(SystemExit) as stopped:
        sweep.main(sweep_args(tmp_path, "--model", "nope"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"argument --model: 'nope' is not a registered model; registered: .*cnn.*mlp", err), err
    assert "--import" in err


def test_a_module_that_cannot_be_imported_names_the_key(tmp_path, capsys):
    mine = tmp_path / "project-of-mine"
    mine.mkdir()
    (mine / "preset.yaml").write_text(PRESET.replace("own_models_of_a_user", "no_such_module_here"))
    write_sklearn_csvs(tmp_path / "data" / "concavity", "concavity")
    with pytest.raises(SystemExit) as stopped:
        sweep.main(sweep_args(tmp_path))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "key 'imports': cannot import 'no_such_module_here' (ModuleNotFoundError" in err


def test_a_model_named_as_module_and_class_needs_no_registration(tmp_path, monkeypatch):
    mine = tmp_path / "project-of-mine"
    mine.mkdir()
    (mine / "unregistered_models_of_a_user.py").write_text(OWN_MODELS.replace('@register_model("own-net")\n', ""))
    preset = PRESET.replace("imports: [own_models_of_a_user]\n", "").replace(
        "own-net", '"unregistered_models_of_a_user:OwnNet"'
    )
    (mine / "preset.yaml").write_text(preset)
    monkeypatch.syspath_prepend(str(mine))
    task = Task(load_preset(mine / "preset.yaml"))
    config = task.config(model_kwargs={"width": 4})
    net = create_model(config.model, (5,), 1, **config.model_kwargs)
    assert type(net).__name__ == "OwnNet" and net(torch.zeros(2, 5)).shape == (2, 1)


OWN_KIND = '''\
import numpy as np

from project.data import register_data_kind
from project.data.images import ImageDataModule


@register_data_kind("npz-images")
class NpzImages(ImageDataModule):
    """Images [N, C, H, W] and their labels in train.npz and test.npz (arrays x and y)."""

    def data_files(self):
        folder = self.data_dir / self.dataset
        return {c: (folder / f, [folder / f]) for c, f in (("training", "train.npz"), ("testing", "test.npz"))}

    def load(self):
        folder = self.data_dir / self.dataset
        train, test = np.load(folder / "train.npz"), np.load(folder / "test.npz")
        self.classes = sorted(set(train["y"].tolist()))
        self.test_ids = np.arange(len(test["x"]))
        return self._keep(train["x"], train["y"], test["x"], test["y"])
'''

DIGITS = """\
name: own-digits
kind: classification
metric: acc
folds: 3
imports: [own_kind_of_a_user]
data: {kind: npz-images, dataset: digits}
model: mlp
models:
  mlp:
    args: {hidden_sizes: [32]}
    train: {batch_size: 32, max_epochs: 5, lr: 1.0e-2}
final: {refit: true}
"""


@pytest.mark.slow
def test_a_data_kind_of_ones_own_is_read_through_a_preset_alone(tmp_path):
    import train
    from sklearn.datasets import load_digits

    mine = tmp_path / "project-of-mine"
    mine.mkdir()
    (mine / "own_kind_of_a_user.py").write_text(OWN_KIND)
    (mine / "preset.yaml").write_text(DIGITS)
    digits = load_digits()
    x, y = (digits.images * 15).astype("uint8")[:, None], digits.target
    (tmp_path / "data" / "digits").mkdir(parents=True)
    np.savez(tmp_path / "data" / "digits" / "train.npz", x=x[:1500], y=y[:1500])
    np.savez(tmp_path / "data" / "digits" / "test.npz", x=x[1500:], y=y[1500:])
    assert train.main(sweep_args(tmp_path)) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["cv_mean"] > 0.85 and summary["test_accuracy"] > 0.85, summary
    submission = pd.read_csv(summary["submission"])
    assert len(submission) == 297 and (submission["label"].to_numpy() == y[1500:]).mean() > 0.85
