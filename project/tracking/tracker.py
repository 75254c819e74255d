"""MLflow through its client: experiments, the study / trial run hierarchy, CV curves, environment.

The client is used directly (not Lightning's MLFlowLogger, which falls back to the deprecated file
store and marks interrupted runs FAILED behind our back), so any process can log into a run it did
not create, given the run id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TypeVar, cast

import pandas as pd
import requests
from google.protobuf.json_format import MessageToDict, ParseDict
from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.service_pb2 import DatasetInput as ProtoDatasetInput
from mlflow.tracking import MlflowClient

from project.cv import CVResult
from project.tracking.journal import PENDING_PREFIX, PROBE_EVERY, Journal, Unresolved, is_unreachable, why_unreachable
from project.utils import files
from project.utils.locks import sqlite_creation_lock
from project.utils.paths import REPO_ROOT

PARENT_TAG = "mlflow.parentRunId"
PACKAGES = ("torch", "lightning", "torchmetrics", "optuna", "mlflow", "pandas", "scikit-learn", "numpy")
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
T = TypeVar("T")
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


# with a tracking server: every request bounded, 10 s to answer and two retries (MLflow's defaults,
# 120 s and seven retries with backoff, wait minutes on a server that has gone away), and no line of
# MLflow's own for each ended run (the sweep gives the experiment's address once); the environment
# overrides each
SERVER_ENV = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def _now() -> int:
    return int(time.time() * 1000)


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
        with contextlib.suppress(metadata.PackageNotFoundError):
            tags[f"version.{package}"] = metadata.version(package)
    return tags


def dataset_entity(dataset: Dataset) -> DatasetEntity:
    """The tracking record of a dataset, from its public ``to_dict()``."""
    fields = dataset.to_dict()
    return DatasetEntity(
        name=fields["name"],
        digest=fields["digest"],
        source_type=fields["source_type"],
        source=fields["source"],
        schema=fields.get("schema"),
        profile=fields.get("profile"),
    )


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
            dataset: Dataset
            if isinstance(content, pd.DataFrame):
                dataset = from_pandas(content, source=str(path), name=name)
            else:
                digest = hashlib.sha256()
                for file in content:
                    digest.update(file.read_bytes())
                source = resolve_dataset_source(str(path))
                # concrete in MLflow; its base class only declares ``profile`` abstract to the type checker
                dataset = MetaDataset(source, name=name, digest=digest.hexdigest()[:8])  # type: ignore[abstract]
            inputs.append(DatasetInput(dataset_entity(dataset), [InputTag("mlflow.data.context", context)]))
    return inputs


class Tracker:
    """One MLflow experiment and the runs logged into it.

    Given ``pending`` (a folder), a tracking server that cannot be reached does not stop or stall
    the work: every request is bounded (``REQUEST_BOUNDS``), the first failure is said once, and
    the writes wait in that folder until the server answers again (see pending.py). Without it an
    unreachable server raises, as MLflow does.
    """

    def __init__(
        self, tracking_uri: str | None, experiment_name: str, pending: Path | None = None, command: str | None = None
    ) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name, self.experiment_id = experiment_name, None
        if self.tracking_uri.startswith(("http://", "https://")):
            for name, value in SERVER_ENV.items():
                os.environ.setdefault(name, value)
        # MLflow draws a progress bar for each artifact download (a model's validation reads its own
        # files back): lines of it in a sweep's log, where the sweep says what it did itself
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.journal = Journal(pending, command or uuid.uuid4().hex) if pending else None
        self._next_probe = 0.0  # while unreachable: when to try the server again
        self._said = False  # this process said the server is unreachable: it says when it is back
        # processes started together against a new store race to create its tables and the
        # experiment: SQLite stores are created under a file lock, and on a database server the
        # loser retries and finds them
        for attempt in range(5):
            try:
                with sqlite_creation_lock(self.tracking_uri):
                    self.client = MlflowClient(self.tracking_uri)
                    self.experiment_id = self._experiment(experiment_name)
                break
            except Exception as err:
                if self.journal is not None and is_unreachable(err):
                    self._unreachable(err)
                    break
                if attempt == 4:
                    raise
                time.sleep(1.0 + attempt)

    @property
    def reachable(self) -> bool:
        return self._next_probe == 0.0

    def _experiment(self, name: str) -> str:
        """The experiment's id; it opens in the UI's model-training view (not the GenAI one)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(
                name, artifact_location=_artifact_root(self.tracking_uri, name), tags={EXPERIMENT_KIND: MODEL_TRAINING}
            )
        if experiment.tags.get(EXPERIMENT_KIND) != MODEL_TRAINING:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        return experiment.experiment_id

    # writes: each is one call of _write, which sends it now or keeps it for later

    def start_run(self, name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> str:
        tags = dict(tags or {})
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        args = {"run": None, "run_name": name, "tags": tags, "start_time": _now()}
        return cast(str, self._write("create_run", args))  # a created run has an id, sent or kept

    def log_inputs(self, run_id: str, inputs: list[DatasetInput]) -> None:
        self._write("log_inputs", {"run": run_id, "datasets": [MessageToDict(d.to_proto()) for d in inputs]})

    def log_params(self, run_id: str, params: dict) -> None:
        items = [[k, json.dumps(v) if isinstance(v, (list, tuple)) else str(v)] for k, v in params.items()]
        for start in range(0, len(items), 100):
            self._write("log_batch", {"run": run_id, "params": items[start : start + 100]})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        """Timestamped now: a resumed study logs its totals again at the same step, and the newest
        value is the run's (and its logged model's, which allows one value per timestamp and step)."""
        now = _now()
        self._log(run_id, [[k, float(v), now, step] for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._write("log_batch", {"run": run_id, "tags": [[k, str(v)] for k, v in tags.items()]})

    def log_cv(self, run_id: str, result: CVResult, folds: Iterable[int]) -> None:
        """CV mean/std and per-fold scores (``fold0_rmse``); the per-epoch curves are the fits' own,
        logged while they train (``project/tracking/logger.py``)."""
        metrics = [["cv_mean", result.mean, 0, 0], ["cv_std", result.std, 0, 0]]
        metrics += [[f"fold{fold}_{result.metric}", score, 0, 0] for fold, score in zip(folds, result.fold_scores)]
        self._log(run_id, metrics)

    def log_rows(self, run_id: str, rows: list[list]) -> None:
        """Metrics as ``[key, value, timestamp in ms, step]`` rows, in batches MLflow accepts."""
        self._log(run_id, rows)

    def _log(self, run_id: str, metrics: list[list]) -> None:
        for start in range(0, len(metrics), _BATCH):
            self._write("log_batch", {"run": run_id, "metrics": metrics[start : start + _BATCH]})

    def log_artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        self._write("log_artifact", {"run": run_id, "path": str(path), "folder": folder})

    def log_text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(text)
            self.log_artifact(run_id, path)

    def set_running(self, run_id: str) -> None:
        self._write("update_run", {"run": run_id, "status": "RUNNING"})

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self._write("set_terminated", {"run": run_id, "status": status, "end_time": _now()})

    def _write(self, op: str, args: dict) -> str | None:
        """Send one write, or keep it: while the server is unreachable, or while earlier writes of
        this process still wait (their order is kept). Returns the run id of a created run."""
        if self.journal is None:
            return self._send(op, args)
        if self.journal.holding or not self.reachable:
            self.flush()
        if not self.journal.holding and self.reachable:
            try:
                return self._send(op, args)
            except Unresolved:
                pass  # it names a run whose creation waits in another process's journal
            except Exception as err:
                if not is_unreachable(err):
                    raise
                self._unreachable(err)
        if op == "create_run":
            args = {**args, "run": self.journal.new_run_id()}
        self.journal.append(op, args)
        return args["run"] if op == "create_run" else None

    def flush(self, everyone: bool = False, force: bool = False) -> int:
        """Send the writes kept while the server was unreachable, if it is time to try again
        (``force``: now); ``everyone``: also those of this command's and earlier commands' ended
        processes. Returns how many were sent."""
        if self.journal is None or (not force and time.monotonic() < self._next_probe):
            return 0
        try:
            if self.experiment_id is None:
                self.experiment_id = self._experiment(self.experiment_name)
            sent = self.journal.send(self._send, everyone=everyone)
        except Exception as err:
            if not is_unreachable(err):
                raise
            self._unreachable(err)
            return 0
        if self._said:
            print(
                f"MLflow tracking at {self.tracking_uri} is reachable again: {sent} kept write(s) sent",
                file=sys.stderr,
                flush=True,
            )
        self._next_probe, self._said = 0.0, False
        return sent

    def send_kept(self, left_for: str | None = None) -> None:
        """Send the writes this command's processes and earlier commands kept while the server was
        unreachable, and say so; ``left_for``: at the end of a command, say who sends what is still
        kept."""
        if self.journal is None:
            return
        sent = self.flush(everyone=True, force=True)
        if sent:
            print(f"sent {sent} MLflow write(s) kept while {self.tracking_uri} was unreachable", flush=True)
        left = self.journal.waiting()
        if left and left_for:
            print(
                f"MLflow tracking at {self.tracking_uri} is still unreachable: {left} write(s) kept in "
                f"{self.journal.folder}; {left_for} sends them",
                file=sys.stderr,
                flush=True,
            )

    def attempt(self, call: Callable[[], T], absent: tuple[type[Exception], ...] = ()) -> T | None:
        """``call()``, a request of its own to the server (a read, logging a model), unless the
        server is unreachable (then None, said once like any write), the call names a run still
        waiting to be created, or it raises one of ``absent`` (what it asked for is not there)."""
        if not self.reachable:
            return None
        try:
            return call()
        except Unresolved:
            return None
        except Exception as err:
            if self.journal is not None and is_unreachable(err):
                self._unreachable(err)
                return None
            if isinstance(err, absent):
                return None
            raise

    def _unreachable(self, err: BaseException) -> None:
        if self.reachable and self.journal is not None and self.journal.first_to_say():
            self._said = True
            print(
                f"MLflow tracking at {self.tracking_uri} is unreachable ({why_unreachable(err)}); "
                f"training goes on, and what it logs is kept in {self.journal.folder} until the server is back",
                file=sys.stderr,
                flush=True,
            )
        self._next_probe = time.monotonic() + PROBE_EVERY

    def _send(self, op: str, args: dict) -> str | None:
        """One write, as MLflow's client makes it; a run's local id is resolved (a run whose
        creation still waits elsewhere raises ``Unresolved``)."""
        if op == "create_run":
            tags = {k: self._resolve(v) for k, v in args["tags"].items()}
            created = self.client.create_run(
                cast(str, self.experiment_id), start_time=args["start_time"], tags=tags, run_name=args["run_name"]
            ).info.run_id
            if args["run"] and self.journal is not None:  # a run created while it was kept
                self.journal.record(args["run"], created)
            return created
        run = self._resolve(args["run"])
        if op == "log_batch":
            self.client.log_batch(
                run,
                metrics=[Metric(*m) for m in args.get("metrics", [])],
                params=[Param(*p) for p in args.get("params", [])],
                tags=[RunTag(k, self._resolve(v)) for k, v in args.get("tags", [])],
            )
        elif op == "log_inputs":
            self.client.log_inputs(
                run, datasets=[DatasetInput.from_proto(ParseDict(d, ProtoDatasetInput())) for d in args["datasets"]]
            )
        elif op == "log_artifact":
            try:
                self.client.log_artifact(run, args["path"], args["folder"])
            except OSError as err:  # a local artifact store (beside a SQLite one) that cannot take the file
                if files.unwritable(err):
                    raise files.WriteFailed(
                        Path(getattr(err, "filename", None) or args["path"]), "an MLflow artifact", err
                    ) from None
                raise
        elif op == "update_run":
            self.client.update_run(run, status=args["status"])
        elif op == "set_terminated":
            self.client.set_terminated(run, args["status"], end_time=args["end_time"])
        else:
            raise ValueError(f"unknown MLflow write {op!r}")
        return None

    def resolve(self, run_id: str) -> str:
        """The id the server knows a run by (a run created while it was unreachable had a local one)."""
        return self.journal.resolve(run_id) if self.journal is not None else run_id

    def _resolve(self, value: str) -> str:
        if self.journal is None or not isinstance(value, str) or not value.startswith(PENDING_PREFIX):
            return value
        resolved = self.journal.resolve(value)
        if resolved == value:
            raise Unresolved(value)
        return resolved

    # reads: none while the server is unreachable

    def read_cv(self, run_id: str, folds: Sequence[int], metric: str) -> CVResult | None:
        """What ``log_cv`` and the fits' ``RunLogger`` logged, read back: per-fold scores and curves
        (None if this store lacks the run, or cannot be reached)."""
        try:
            run_id = self._resolve(run_id)
            logged = self.client.get_run(run_id).data.metrics
            scores, history = [], []
            for fold in folds:
                if f"fold{fold}_{metric}" not in logged:
                    return None
                logged_as = {"train_loss": f"train/loss/fold_{fold}", f"val_{metric}": f"val/{metric}/fold_{fold}"}
                curves = {
                    key: {m.step: m.value for m in self.client.get_metric_history(run_id, name)}
                    for key, name in logged_as.items()
                }
                scores.append(logged[f"fold{fold}_{metric}"])
                history.append(
                    [
                        {"epoch": epoch, **{k: c[epoch] for k, c in curves.items() if epoch in c}}
                        for epoch in sorted(curves["train_loss"])
                    ]
                )
        except (MlflowException, Unresolved, requests.exceptions.RequestException):
            return None
        return CVResult(metric, scores, history, logged.get("seconds", 0.0))

    def run_status(self, run_id: str) -> str | None:
        """The run's status (RUNNING, FINISHED, ...); None if this store lacks it or cannot be reached."""
        return self.attempt(lambda: self.client.get_run(self._resolve(run_id)).info.status, absent=(MlflowException,))

    def download_artifact(self, run_id: str, path: str, folder: Path) -> Path | None:
        """A run's artifact ``path``, downloaded into ``folder``; None where the run, the file or
        the server is not there."""

        def download() -> Path:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(self.client.download_artifacts(self._resolve(run_id), path, str(folder)))

        return self.attempt(download, absent=(MlflowException, OSError))

    def running_runs(self, **tags: str) -> list:
        """This experiment's RUNNING runs with these tags (none while the server cannot be asked)."""
        experiment_id = self.experiment_id
        if experiment_id is None:
            return []
        runs: list = (
            self.attempt(
                lambda: self.client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
            )
            or []
        )
        return [r for r in runs if all(r.data.tags.get(k) == v for k, v in tags.items())]

    def has_run(self, run_id: str) -> bool:
        """Whether the run exists (a run still waiting to be created counts, and so does any run
        while the server cannot be asked)."""
        if self.journal is not None and (not self.reachable or self.journal.resolve(run_id).startswith(PENDING_PREFIX)):
            return True
        return self.run_status(run_id) is not None or not self.reachable

    def ui_command(self) -> str:
        """The command that serves this store, and the experiment's page in the model-training view
        (MLflow 3's UI opens on its GenAI view unless the address asks for the other)."""
        return (
            f"mlflow ui --backend-store-uri {self.tracking_uri} --host 127.0.0.1\n  then open "
            f"http://127.0.0.1:5000/#/experiments/{self.experiment_id}/runs?workflowType=machine_learning"
        )
