"""MLflow through its client: experiments, the study / trial run hierarchy, CV curves, environment.

The client is used directly (not Lightning's MLFlowLogger, which falls back to the deprecated file
store and marks interrupted runs FAILED behind our back), so any process can log into a run it did
not create, given the run id.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import mlflow.data
import pandas as pd
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from project.cv import CVResult
from project.paths import REPO_ROOT
from project.tuning.locks import sqlite_creation_lock

PARENT_TAG = "mlflow.parentRunId"
PACKAGES = ("torch", "lightning", "torchmetrics", "optuna", "mlflow", "pandas", "scikit-learn", "numpy")
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri(uri: str | None) -> str:
    """``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<repo>/mlflow.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


def _artifact_root(tracking_uri: str, experiment_name: str) -> str | None:
    """Beside a SQLite store, artifacts go to ``mlartifacts/`` next to the database file."""
    if not tracking_uri.startswith("sqlite:///"):
        return None  # a tracking server chooses its own artifact store
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    return (db.parent / "mlartifacts" / experiment_name).resolve().as_uri()


def source_tags(entry_point: str | None = None) -> dict[str, str]:
    """What the runs table's Source column shows: the script that ran (default: this process's)
    and the git commit of the code."""
    script = Path(entry_point or sys.argv[0]).resolve()
    name = str(script.relative_to(REPO_ROOT)) if script.is_relative_to(REPO_ROOT) else str(script)
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except OSError:
        pass
    return tags


def environment_tags(entry_point: str | None = None) -> dict[str, str]:
    """The run's source and the versions it ran with."""
    tags = {"python": platform.python_version(), "platform": platform.platform(), **source_tags(entry_point)}
    for package in PACKAGES:
        try:
            tags[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return tags


def dataset_inputs(datamodule) -> list[DatasetInput]:
    """A task's train and test data as MLflow dataset inputs: tables with their schema, row count
    and a digest of their content, image files with the sha256 of their bytes; each with its
    source path, so a run's Dataset column says what it was trained and tested on."""
    inputs = []
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and says so on every path; and it hints
        # that integer columns cannot hold missing values, which concerns models, not a record
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        for context, (path, content) in datamodule.data_files().items():
            name = f"{datamodule.dataset}/{path.name}"
            if isinstance(content, pd.DataFrame):
                dataset = mlflow.data.from_pandas(content, source=str(path), name=name)
            else:
                digest = hashlib.sha256()
                for file in content:
                    digest.update(file.read_bytes())
                dataset = MetaDataset(resolve_dataset_source(str(path)), name=name, digest=digest.hexdigest()[:8])
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", context)]))
    return inputs


class Tracker:
    """One MLflow experiment and the runs logged into it."""

    def __init__(self, tracking_uri: str | None, experiment_name: str) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        # processes started together against a new store race to create its tables and the
        # experiment: SQLite stores are created under a file lock, and on a database server the
        # loser retries and finds them
        for attempt in range(5):
            try:
                with sqlite_creation_lock(self.tracking_uri):
                    self.client = MlflowClient(self.tracking_uri)
                    self.experiment_id = self._experiment(experiment_name)
                break
            except Exception:  # noqa: BLE001 - MLflow, SQLAlchemy and alembic each raise their own
                if attempt == 4:
                    raise
                time.sleep(1.0 + attempt)

    def _experiment(self, name: str) -> str:
        """The experiment's id; it opens in the UI's model-training view (not the GenAI one)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=_artifact_root(self.tracking_uri, name),
                                                 tags={EXPERIMENT_KIND: MODEL_TRAINING})
        if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment.experiment_id

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    def log_inputs(self, run_id: str, inputs: list[DatasetInput]) -> None:
        self.client.log_inputs(run_id, datasets=inputs)

    def log_params(self, run_id: str, params: dict) -> None:
        items = [Param(k, json.dumps(v) if isinstance(v, (list, tuple)) else str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Timestamped now: a resumed study logs its totals again at the same step, and the newest
        value is the run's (and its logged model's, which allows one value per timestamp and step)."""
        now = int(time.time() * 1000)
        self._log(run_id, [Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_cv(self, run_id: str, result: CVResult, folds: Iterable[int]) -> None:
        """CV mean/std, per-fold scores and per-epoch per-fold curves (``fold0/val_rmse`` ...)."""
        metrics = [Metric("cv_mean", result.mean, 0, 0), Metric("cv_std", result.std, 0, 0)]
        for fold, score, history in zip(folds, result.fold_scores, result.history):
            metrics.append(Metric(f"fold{fold}_{result.metric}", score, 0, 0))
            for record in history:
                for key, value in record.items():
                    if key != "epoch":
                        metrics.append(Metric(f"fold{fold}/{key}", float(value), 0, record["epoch"]))
        self._log(run_id, metrics)

    def read_cv(self, run_id: str, folds: Sequence[int], metric: str) -> CVResult | None:
        """What ``log_cv`` logged, read back: per-fold scores and curves (None if this store lacks the run)."""
        try:
            logged = self.client.get_run(run_id).data.metrics
        except MlflowException:
            return None
        scores, history = [], []
        for fold in folds:
            if f"fold{fold}_{metric}" not in logged:
                return None
            curves = {key: {m.step: m.value for m in self.client.get_metric_history(run_id, f"fold{fold}/{key}")}
                      for key in ("train_loss", f"val_{metric}")}
            scores.append(logged[f"fold{fold}_{metric}"])
            history.append([{"epoch": epoch, **{k: c[epoch] for k, c in curves.items() if epoch in c}}
                            for epoch in sorted(curves["train_loss"])])
        return CVResult(metric, scores, history, logged.get("seconds", 0.0))

    def _log(self, run_id: str, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + _BATCH])

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def has_run(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def ui_command(self) -> str:
        """The command that serves this store, and the experiment's page in the model-training view
        (MLflow 3's UI opens on its GenAI view unless the address asks for the other)."""
        return (f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1\n  then open "
                f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning")
