"""What a run delivers, written in one place for train, sweep and export: the submission, the
model folder, ``summary.json`` and the MLflow Model (registered under the task's name where a
study made it), each logged to the run that made it."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch
from mlflow.entities.model_registry import ModelVersion

from project.artifacts.predictor import Predicts
from project.artifacts.serving import log_predictor
from project.cv import TrainingDiverged
from project.data import DataError
from project.tracking.tracker import Tracker
from project.utils import files
from project.utils.devices import training_device
from project.utils.files import WriteFailed
from project.utils.stopping import Interrupted


def deliver(
    predictor: Predicts,
    datamodule,
    out_dir: Path,
    summary: dict,
    tracker: Tracker,
    run_id: str | None,
    *,
    submission_written: bool = False,
    registered_name: str | None = None,
    tags: dict | None = None,
    plots: Sequence[Path] = (),
) -> dict:
    """Write the deliverables of ``predictor`` into ``out_dir`` and log them to ``run_id``: the
    submission (unless a refit wrote it already), the model folder and ``summary.json``, then the
    MLflow Model, registered where ``registered_name`` is given. Returns the summary as written."""
    submission = out_dir / predictor.task.preset.submission.file
    test_inputs: pd.DataFrame = datamodule.test_inputs()  # read once: the file for a table task
    if not submission_written:
        predictor.to(training_device()).write_submission(test_inputs, submission, datamodule.test_ids)
        predictor.to(torch.device("cpu"))
    summary["submission"] = str(submission)
    summary["model"] = str(predictor.save(out_dir / "model"))
    summary["mlflow"] = {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id, "run_id": run_id}
    files.write_json(out_dir / "summary.json", summary, "the summary")
    if run_id is None:
        return summary
    for plot in plots:
        tracker.log_artifact(run_id, plot, "plots")
    for path in (out_dir / "summary.json", submission):
        tracker.log_artifact(run_id, path)
    logged = tracker.attempt(
        lambda: (
            log_predictor(
                predictor,
                tracker.tracking_uri,
                tracker.resolve(run_id),
                test_inputs,
                registered_name=registered_name,
                tags=tags,
                saved=Path(summary["model"]),
            )
            or "logged"
        )
    )
    if logged is None and registered_name:
        print(
            f"the MLflow Model is not registered, tracking being unreachable: it is saved in {summary['model']}, "
            "and experiments/export_submission.py registers it once the server is back",
            file=sys.stderr,
        )
    elif logged is None:
        print(
            f"the MLflow Model is not logged, tracking being unreachable: it is saved in {summary['model']}",
            file=sys.stderr,
        )
    elif isinstance(logged, ModelVersion):
        summary["registered_model"] = f"models:/{logged.name}/{logged.version}"
        files.write_json(out_dir / "summary.json", summary, "the summary")
    return summary


class EndingRun:
    """A run of one command, ended as its work ends: FINISHED, or on a fault this command owns,
    FAILED (a diverged fit, bad data, a file that could not be written) or KILLED (a stop on
    request), the fault said in one line; ``code`` is then the command's exit code."""

    def __init__(self, tracker: Tracker, run_id: str, left_for: str) -> None:
        self.tracker, self.run_id, self.left_for, self.code = tracker, run_id, left_for, 0

    def __enter__(self) -> EndingRun:
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        status, handled = "FINISHED", True
        if isinstance(err, Interrupted):
            status, self.code = "KILLED", err.exit_code
            self.tracker.set_tags(self.run_id, {"failure": "interrupted"})
            print(f"stopped, {err}: MLflow run {self.run_id} KILLED", file=sys.stderr)
        elif isinstance(err, (TrainingDiverged, DataError, WriteFailed)):
            status, self.code = "FAILED", 1
            self.tracker.set_tags(self.run_id, {"failure": str(err)})
            advice = "; try a smaller --lr" if isinstance(err, TrainingDiverged) else ""
            print(f"error: {err}{advice}", file=sys.stderr)
        elif err is not None:
            status, handled = "FAILED", False
        self.tracker.end_run(self.run_id, status)
        self.tracker.send_kept(left_for=self.left_for)
        return handled
