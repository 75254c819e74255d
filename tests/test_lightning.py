"""Lightning as its users know it: the Trainer's arguments, callbacks and loggers from the preset
reach every fit, metrics go through self.log to them and live to MLflow, the DataModule reaches
the Trainer, and project/ uses Lightning's public API only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import lightning as L
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from project.cv import build_module, chunked, make_trainer
from project.engine import FoldModule
from project.tasks import Task
from project.validate import load_preset
from tests.conftest import write_sklearn_csvs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import sweep  # noqa: E402
import train  # noqa: E402


class SeesTheDataModule(L.Callback):
    """A callback of one's own that reads what the Trainer was handed."""

    seen: ClassVar[list[str]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        SeesTheDataModule.seen.append(f"{type(datamodule).__name__} {len(datamodule.members)} members")


PRESET = """\
extends: house-prices
folds: 3
trainer: {{min_epochs: 2, enable_model_summary: false}}
callbacks:
  - {{class: "lightning.pytorch.callbacks:EarlyStopping", args: {{monitor: val/rmse, patience: 3, mode: min}}}}
  - {{class: "lightning.pytorch.callbacks:ModelCheckpoint", args: {{monitor: val/rmse, mode: min, save_top_k: 1}}}}
  - {{class: "lightning.pytorch.callbacks:LearningRateMonitor", args: {{logging_interval: epoch}}}}
  - {{class: "tests.test_lightning:SeesTheDataModule"}}
loggers:
  - {{class: "lightning.pytorch.loggers:CSVLogger", args: {{save_dir: "{csv}"}}}}
models:
  mlp:
    train: {{batch_size: 64, max_epochs: 150, lr: 0.03, weight_decay: 1.0e-4}}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_the_presets_trainer_callbacks_and_loggers_reach_every_fit(real_data, tmp_path):
    """train.py on House Prices with the preset's EarlyStopping (it stops before max_epochs), its
    ModelCheckpoint (a checkpoint per fit, which reloads to its recorded best score), its
    LearningRateMonitor (the learning rate in the MLflow run), a callback of one's own (it finds the
    DataModule on the Trainer) and a CSVLogger beside the MLflow run."""
    preset = write(tmp_path, PRESET.format(csv=tmp_path / "csv"))
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    SeesTheDataModule.seen.clear()
    args = ["--config", str(preset), "--data-dir", str(real_data), "--output-dir", str(out), "--tracking-uri", uri]
    assert train.main(args) == 0
    assert SeesTheDataModule.seen == ["TableDataModule 3 members"]

    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(uri)
    run_id = summary["mlflow"]["run_id"]
    curve = client.get_metric_history(run_id, "val/rmse/fold_0")
    epochs = [m.step for m in curve]
    assert epochs == list(range(len(epochs))) and 2 <= len(epochs) < 150  # stopped early
    assert summary["fold_scores"][0] == pytest.approx(curve[-1].value)
    logged = client.get_run(run_id).data.metrics
    assert {"val/rmse", "train/loss", "val/rmse/fold_2", "train/loss/fold_2"} <= set(logged)
    assert any(name.startswith("lr-") for name in logged), sorted(logged)

    csv = pd.read_csv(next((tmp_path / "csv").glob("lightning_logs/version_*/metrics.csv")))
    assert csv["val/rmse"].dropna().size == len(epochs)
    means, fold_0 = (csv.dropna(subset=[name]) for name in ("val/rmse", "val/rmse/fold_0"))
    assert means["step"].tolist() == fold_0["step"].tolist()  # each fold's curve at the steps of the mean's

    (path,) = (out / "lightning" / "train-house-prices" / "folds_0-2" / "checkpoints").glob("*.ckpt")
    saved = torch.load(path, weights_only=False)
    best = next(v["best_model_score"] for k, v in saved["callbacks"].items() if k.startswith("ModelCheckpoint"))
    task = Task(load_preset(preset))
    datamodule = task.prepared(real_data, fold=[0, 1, 2], seed=0)
    fresh = build_module(task, task.config(), datamodule, datamodule.members, seed=0)
    module = chunked(FoldModule).load_from_checkpoint(path, net=fresh.net, head=fresh.head)
    loader = datamodule.val_loader(nonzero=module.net.accepts_nonzero)
    (scores,) = make_trainer(1).validate(module, dataloaders=loader, verbose=False)
    assert scores["val/rmse"] == pytest.approx(float(best), rel=1e-5)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("trainer.max_epochs=3", "key 'trainer.max_epochs': the engine sets it for every fit; use the training "),
        ("trainer.strategy=ddp", "key 'trainer.strategy': the engine sets it for every fit; use one device per fit"),
        ("trainer.no_such_flag=1", "key 'trainer.no_such_flag': not an argument of lightning.Trainer"),
        (
            "callbacks=[{class: 'lightning.pytorch.callbacks:EarlyStopping', args: {monitor: val/rsme}}]",
            "key 'callbacks[0].args.monitor': 'val/rsme' is not logged; expected train/loss or val/rmse",
        ),
        (
            "callbacks=[{class: 'lightning.pytorch.callbacks:EarlyStopping', args: {monitor: val/acc}}]",
            "key 'callbacks[0].args.monitor': 'val/acc' is not logged",
        ),
        (
            "callbacks=[{class: 'lightning.pytorch.callbacks:EarlyStopping', args: {monitor: val/rmse/fold_2}}]",
            "key 'callbacks[0].args.monitor': 'val/rmse/fold_2' is a fold's figure, which goes to the loggers alone",
        ),
        (
            "callbacks=[{class: 'lightning.pytorch.loggers:CSVLogger'}]",
            "key 'callbacks[0].class': 'lightning.pytorch.lo",
        ),
        (
            "loggers=[{class: 'no_such_module:Logger'}]",
            "key 'loggers[0].class': 'no_such_module:Logger' is not importable",
        ),
        (
            "callbacks=[{class: 'lightning.pytorch.callbacks:EarlyStopping', args: {patience: 3}}]",
            "key 'callbacks[0].args': missing a required argument: 'monitor'",
        ),
    ],
)
def test_a_trainer_key_callback_or_logger_that_cannot_work_is_refused_naming_the_key(tmp_path, capsys, override, said):
    for main in (train.main, sweep.main):
        with pytest.raises(SystemExit) as stop:
            main(["--set", override, "--output-dir", str(tmp_path / "out"), "--data-dir", str(tmp_path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err


def test_a_monitor_of_a_maximised_metric_must_say_max(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train.main(
            [
                "--task",
                "fashion-mnist",
                "--set",
                "callbacks=[{class: 'lightning.pytorch.callbacks:EarlyStopping', args: {monitor: val/acc}}]",
                "--data-dir",
                str(tmp_path),
            ]
        )
    assert stop.value.code == 2
    assert (
        "key 'callbacks[0].args.mode': 'min (the default)' for val/acc, which is better higher; expected mode: max"
        in (capsys.readouterr().err)
    )


HANDSHAKE = '''\
import os

import lightning as L


class Handshake(L.Callback):
    """At the start of epoch 3 of the trial's fit: say so, then wait to be let go."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 3:
            with open(os.environ["READY_FIFO"], "w") as ready:
                ready.write("ready\\n")
            with open(os.environ["GO_FIFO"]) as go:
                go.read()
'''

LIVE = """\
name: concavity
kind: regression
metric: rmse
folds: 3
imports: [handshake]
callbacks: [{class: "handshake:Handshake"}]
data: {kind: csv, dataset: concavity, id: id, target: worst_concavity, target_transform: log1p}
models:
  mlp:
    args: {hidden_sizes: [16], dropout: 0.0}
    train: {batch_size: 32, max_epochs: 6, lr: 3.0e-3}
sweep: {trials: 1, jobs: 1, pruning: false}
"""


@pytest.mark.slow
def test_a_trials_epoch_metrics_are_in_mlflow_while_it_trains(tmp_path):
    """Another process reads the trial's run while the trial is held at its fourth epoch (a
    handshake through two FIFOs, no sleeping): the first epochs' curves of every fold are there."""
    (tmp_path / "handshake.py").write_text(HANDSHAKE)
    (tmp_path / "live.yaml").write_text(LIVE)
    write_sklearn_csvs(tmp_path / "data" / "concavity", "concavity")
    ready, go = tmp_path / "ready", tmp_path / "go"
    os.mkfifo(ready)
    os.mkfifo(go)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--config", str(tmp_path / "live.yaml"), "--data-dir", str(tmp_path / "data")]
    args += ["--output-dir", str(tmp_path / "out"), "--tracking-uri", uri]
    env = {**os.environ, "READY_FIFO": str(ready), "GO_FIFO": str(go)}
    sweeping = subprocess.Popen(
        [sys.executable, str(REPO / "experiments" / "sweep.py"), *args], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        with open(ready) as said:  # blocks until the trial reaches its fourth epoch
            assert said.read() == "ready\n"
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("concavity").experiment_id
        (trial,) = client.search_runs([experiment], "tags.trial_number = '0'")
        assert client.get_run(trial.info.run_id).info.status == "RUNNING"
        for fold in range(3):
            assert [m.step for m in client.get_metric_history(trial.info.run_id, f"val/rmse/fold_{fold}")][:1] == [0]
    finally:
        with open(go, "w") as release:
            release.write("go\n")
        _, err = sweeping.communicate(timeout=600)
    assert sweeping.returncode == 0, err[-3000:]
    curve = client.get_metric_history(trial.info.run_id, "val/rmse/fold_0")
    assert sorted(m.step for m in curve) == list(range(6))  # the rest, sent at the end of the fit


LIGHTNING_INTERNALS = [
    (r"\bfit_loop\b", "the Trainer's fit loop"),
    (r"callback_metrics\s*(\[[^]]*\]\s*=|\.update\(|\.__setitem__|=(?!=))", "a write into callback_metrics"),
    (r"\btrainer\._\w+", "a private attribute of the Trainer"),
    (r"\b(pl_module|self)\.trainer\._\w+", "a private attribute of the Trainer"),
    (r"from lightning[\w.]* import _\w+", "a private name of Lightning"),
    (r"\blightning(\.\w+)*\._\w+", "a private module or name of Lightning"),
    (r"\._(logger|checkpoint|data|accelerator|callback)_connector\b|\._results\b", "a connector of the Trainer"),
]


def test_the_package_uses_lightnings_public_api_only():
    found = []
    for path in sorted((REPO / "project").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in LIGHTNING_INTERNALS:
                if re.search(pattern, line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_run_logger_sends_a_fits_epochs_in_few_requests(monkeypatch):
    """Lightning calls save() after every log_metrics: the logger sends the first epoch at once,
    then at most one request every 2 s, and the rest when the fit ends; every epoch arrives, in
    order, with the epoch as its step."""
    from project.tracking import logger as run_logger

    sent: list[tuple[str, list]] = []

    class Recording:
        def log_rows(self, run_id: str, rows: list) -> None:
            sent.append((run_id, rows))

    clock = [0.0]
    monkeypatch.setattr(run_logger.time, "monotonic", lambda: clock[0])
    logger = run_logger.RunLogger(Recording(), "run-0", "trial-0", "folds_0-4", every=2.0)
    for epoch in range(50):  # a quarter of a second an epoch
        logger.log_metrics({"val/rmse": 1.0 / (epoch + 1), "epoch": epoch}, step=7 * epoch)
        logger.save()
        clock[0] += 0.25
    logger.finalize("success")
    assert len(sent) == 8  # epochs 0, 8, 16, ..., 48 as the clock passes each 2 s, and 49 at the end
    assert {run for run, _ in sent} == {"run-0"}
    assert [row[3] for _, rows in sent for row in rows] == list(range(50))
