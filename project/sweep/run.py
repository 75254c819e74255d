"""A sweep from start to end: open and check the study, run the workers, export the deliverables.

``run_sweep`` reads as the happy path; the faults are owned by ``StudyRun`` (a stop on request, a
file that could not be written, a database that went away, bad data), each said in one line,
with the study's MLflow run ended as the fault says and nothing finished lost.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from project.config import to_yaml
from project.data import DataError
from project.sweep.export import NoCompleteTrial, export_best, study_summary
from project.sweep.recovery import recover_stale_trials
from project.sweep.report import print_report
from project.sweep.space import start_point
from project.sweep.study import (
    STORAGE_ERRORS,
    StorageUnreachable,
    SweepSettings,
    WorkerCouldNotWrite,
    check_frozen,
    open_study,
    run_workers,
)
from project.tracking.journal import PENDING_PREFIX
from project.tracking.tracker import Tracker, dataset_inputs, environment_tags
from project.utils import files
from project.utils.files import WriteFailed
from project.utils.stopping import Interrupted

PARENT_ATTR = "mlflow_parent_run_id"


class CannotStart(ValueError):
    """The sweep cannot start with these settings; the message names the flag."""


def run_sweep(settings: SweepSettings, n_trials: int, n_jobs: int, timeout: float | None = None) -> int:
    """Run ``n_trials`` more trials of the study ``settings`` name in ``n_jobs`` worker processes,
    then export the study's deliverables; returns the command's exit code."""
    tracker = settings.tracker()
    tracker.send_kept()  # what an earlier command could not log
    study = open_checked(settings, tracker)
    recovered = recover_stale_trials(study, tracker)
    if recovered:
        print(f"marked FAIL {len(recovered)} trial(s) left RUNNING by a dead worker: {recovered}")
    task, out = settings.task, Path(settings.output_dir or ".")
    with StudyRun(study, settings, tracker) as run:
        datamodule = settings.datamodule(task)
        settings.parent_run_id = parent_run(study, tracker, settings, datamodule)
        before = len(study.trials)
        if before == 0:
            study.enqueue_trial(start_point(task, settings.model, settings.fixed))
        print(
            f"study {settings.study_name!r} in {settings.storage}: {before} trial(s) so far; running {n_trials} "
            f"more with {n_jobs} worker(s), {settings.validation_folds} of {settings.folds} folds per trial"
        )
        started = time.perf_counter()
        with Progress(study, before, n_trials, task.metric):
            lost = run_workers(settings, n_trials, n_jobs, timeout, tracker)
        elapsed = time.perf_counter() - started
        summary = export_best(study, settings, tracker, out, settings.parent_run_id)
        tracker.end_run(settings.parent_run_id, "FAILED" if lost else "FINISHED")
        tracker.send_kept(left_for="the next command on this study")
        print_report(summary, study, n_trials, elapsed, time.perf_counter() - started - elapsed, out, tracker, lost)
        run.code = 1 if lost or summary.get("estimator_errors") else 0
    return run.code


def open_checked(settings: SweepSettings, tracker: Tracker) -> optuna.Study:
    """The study, opened and checked against the settings it was created with, before any work."""
    try:
        study = open_study(settings)
    except Exception as err:  # noqa: BLE001 - an unreachable or foreign database: name it and stop before any work
        raise CannotStart(f"argument --storage: cannot open {settings.storage}: {str(err).splitlines()[0]}") from None
    try:
        check_frozen(study, settings)
    except ValueError as err:
        raise CannotStart(str(err)) from None
    kept_run = study.user_attrs.get(PARENT_ATTR, "")
    if kept_run.startswith(PENDING_PREFIX) and tracker.journal is not None:  # its run exists now
        study.set_user_attr(PARENT_ATTR, tracker.journal.resolve(kept_run))
    return study


class StudyRun:
    """The faults of a sweep, each said in one line, with the study's MLflow run ended as it says:
    a stop on request (KILLED; the running trials end FAIL), a file that could not be written, a
    database that went away or no trial that completed (FAILED); bad data stops it with exit code 1.
    ``code``: the exit code."""

    def __init__(self, study: optuna.Study, settings: SweepSettings, tracker: Tracker) -> None:
        self.study, self.settings, self.tracker, self.code = study, settings, tracker, 0
        self.out = Path(settings.output_dir or ".")

    def __enter__(self) -> StudyRun:
        return self

    def __exit__(self, kind, err, traceback) -> bool:
        if isinstance(err, DataError):
            print(f"error: {err}", file=sys.stderr)
            self.code = 1
            return True
        run_id = self.settings.parent_run_id
        if err is None or run_id is None:
            return False
        if isinstance(err, Interrupted):
            self.code = stopped(err, self.study, self.settings, self.tracker, run_id, self.out)
        elif isinstance(err, (WriteFailed, WorkerCouldNotWrite)):
            self.code = could_not_write(err, self.tracker, run_id, self.out)
        elif isinstance(err, StorageUnreachable):
            self.code = storage_lost(err, self.tracker, run_id)
        elif isinstance(err, NoCompleteTrial):
            self.code = nothing_completed(err, self.tracker, run_id)
        else:
            return False
        return True


class Progress(threading.Thread):
    """Polls the study: a bar over this invocation's trials and one line per finished trial."""

    def __init__(self, study, first_number: int, total: int, metric: str) -> None:
        super().__init__(daemon=True)
        self.study, self.first, self.metric = study, first_number, metric
        self.bar = tqdm(total=total, desc="trials", unit="trial", dynamic_ncols=True, disable=None)  # off without a tty
        self.seen: set[int] = set()
        self.done = threading.Event()

    def poll(self) -> None:
        try:
            trials = self.study.get_trials(deepcopy=False)
        except STORAGE_ERRORS:
            return  # the database server is away: the sweep stops and says so
        for trial in trials:
            if trial.number < self.first or trial.number in self.seen or not trial.state.is_finished():
                continue
            self.seen.add(trial.number)
            params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
            if trial.state == TrialState.PRUNED:  # its value is the last intermediate one, not a CV score
                value = f"at_prune_{self.metric}={trial.value:.5f}" if trial.value is not None else ""
            elif trial.value is not None:
                value = f"cv_{self.metric}={trial.value:.5f}"
            else:
                value = trial.user_attrs.get("failure", "")
            self.bar.write(f"trial {trial.number:>3} {trial.state.name:<8} {value}  {params}")
            self.bar.update(1)

    def run(self) -> None:
        while not self.done.wait(1.0):
            self.poll()

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.poll()
        self.bar.close()

    def __enter__(self) -> Progress:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def parent_run(study, tracker: Tracker, settings: SweepSettings, datamodule) -> str:
    """One MLflow run per study, created by the coordinator before any worker starts; reused on resume."""
    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id and tracker.has_run(run_id):
        tracker.set_running(run_id)
        return run_id
        # otherwise the study outlived its MLflow store (or uses another one): start a new parent run
    run_id = tracker.start_run(
        f"study-{settings.study_name}", tags={**environment_tags(settings.entry_point), "kind": "study"}
    )
    tracker.log_inputs(run_id, dataset_inputs(datamodule))
    tracker.log_text(run_id, to_yaml(settings.preset), "preset.yaml")
    tracker.log_params(
        run_id,
        {
            "task": settings.preset["name"],
            "model": settings.model,
            "folds": settings.folds,
            "seed": settings.seed,
            "stacking": settings.stacking,
            "storage": settings.storage,
            "study_name": settings.study_name,
            **{f"fixed.{k}": v for k, v in settings.fixed.items()},
        },
    )
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def could_not_write(err: Exception, tracker: Tracker, run_id: str, out: Path) -> int:
    """A file that could not be written (a full disk, a read-only folder): the study's run ends
    FAILED with the reason; the finished trials stay in the study, for the export to finish from."""
    tracker.set_tags(run_id, {"failure": str(err)})
    tracker.end_run(run_id, "FAILED")
    tracker.send_kept(left_for="the next command on this study")
    print(
        f"error: {err}; the finished trials are kept in the study: once there is room, "
        f"`python experiments/export_submission.py --output-dir {out}` (or this command again) writes the rest",
        file=sys.stderr,
    )
    return 1


def storage_lost(err: StorageUnreachable, tracker: Tracker, run_id: str) -> int:
    """The study's database went away: its run ends FAILED; the trials running then stay RUNNING."""
    tracker.set_tags(run_id, {"failure": str(err)})
    tracker.end_run(run_id, "FAILED")
    tracker.send_kept(left_for="the next command on this study")
    print(
        f"error: {err}; the study is as its database holds it: the trials running then are failed by "
        "the next command on it",
        file=sys.stderr,
    )
    return 1


def nothing_completed(err: NoCompleteTrial, tracker: Tracker, run_id: str) -> int:
    """Every trial failed (a model that raises, say): one line naming the first failure; the study
    and its runs stay, each failed trial's run with its error and traceback."""
    tracker.set_tags(run_id, {"failure": str(err)})
    tracker.end_run(run_id, "FAILED")
    tracker.send_kept(left_for="the next command on this study")
    print(f"error: {err}", file=sys.stderr)
    return 1


def stopped(err: Interrupted, study, settings: SweepSettings, tracker: Tracker, run_id: str, out: Path) -> int:
    """A stop on request: the running trials ended FAIL ("interrupted") with KILLED runs; end the
    study's run and write what the study holds."""
    summary = {
        **study_summary(study, settings),
        "interrupted": str(err),
        "mlflow": {
            "tracking_uri": tracker.tracking_uri,
            "experiment_id": tracker.experiment_id,
            "run_id": run_id,
        },
    }
    files.write_json(out / "summary.json", summary, "the summary")
    tracker.set_tags(run_id, {"interrupted": str(err)})
    tracker.end_run(run_id, "KILLED")
    tracker.send_kept(left_for="the next command on this study")
    best = (
        f"; best so far trial {summary['best_trial']}, cv_{summary['metric']} {summary['cv_mean']:.5f}"
        if "best_trial" in summary
        else ""
    )
    print(
        f"stopped, {err}: {summary['n_complete']} trial(s) complete, {summary['n_failed']} failed{best}; "
        f"summary: {out / 'summary.json'}; the same command resumes the study",
        file=sys.stderr,
    )
    return err.exit_code
