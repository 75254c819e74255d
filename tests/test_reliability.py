"""Crashes and concurrency: kill -9 then resume, and two workers on a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from project.sweep.recovery import WORKER_ATTR, recover_stale_trials
from project.sweep.study import make_storage
from project.tracking.tracker import Tracker
from tests.servers import PostgresCluster

REPO = Path(__file__).resolve().parents[1]
SWEEP = [sys.executable, str(REPO / "experiments" / "sweep.py")]


def sweep_args(data_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--folds",
        "2",
        "--max-epochs",
        "30",
        "--hidden-sizes",
        "16",
        "--output-dir",
        str(tmp_path / "out"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]


def trials(storage: str, name: str = "house-prices") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=make_storage(storage)).get_trials(deepcopy=False)


def wait_for(predicate, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (KeyError, ValueError, sqlalchemy.exc.SQLAlchemyError):
            pass  # the database or the study does not exist yet
        time.sleep(0.5)
    raise AssertionError(f"condition not met within {seconds} s")


FAULT_SWEEP = [sys.executable, str(REPO / "tests" / "fault_sweep.py")]
# where in a trial's life the whole sweep is killed: from outside at any moment once three trials
# have finished, or from inside (tests/fault_sweep.py) at a named point of trial 4 or later (by then
# at least three have finished: two workers run at most two trials at once)
KILL_POINTS = ["outside", "created", "mid-fold", "logging", "run-ended"]


def kill_sweep_at(point: str, args: list[str], storage: str) -> None:
    if point == "outside":
        sweep = subprocess.Popen(
            [*SWEEP, *args], cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for(
                lambda: (
                    sum(t.state.is_finished() for t in trials(storage)) >= 3
                    and any(t.state == TrialState.RUNNING for t in trials(storage))
                ),
                180,
            )
        finally:
            os.killpg(sweep.pid, signal.SIGKILL)  # the coordinator and both workers, mid-trial
            sweep.wait()
        return
    sweep = subprocess.run(
        [*FAULT_SWEEP, *args],
        cwd=REPO,
        start_new_session=True,
        capture_output=True,
        text=True,
        env={**os.environ, "FAULT": point},
        timeout=300,
    )
    assert sweep.returncode == -signal.SIGKILL, sweep.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_then_resume_keeps_finished_work(real_data, tmp_path, point):
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    kill_sweep_at(point, sweep_args(real_data, tmp_path, "--n-trials", "200", "--n-jobs", "2"), storage)
    before = {t.number: t.state for t in trials(storage) if t.state.is_finished()}
    assert len(before) >= 3 and any(t.state == TrialState.RUNNING for t in trials(storage))

    rerun = subprocess.run(
        [*SWEEP, *sweep_args(real_data, tmp_path, "--n-trials", "2")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "left RUNNING by a dead worker" in rerun.stdout
    after = trials(storage)
    assert not [t.number for t in after if t.state == TrialState.RUNNING]
    assert all(after[n].state == state for n, state in before.items())  # nothing finished was lost
    new = [t for t in after if t.number not in before and t.state != TrialState.FAIL]
    assert len(new) == 2 and all(t.state.is_finished() for t in new)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("house-prices")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    failed = [t for t in after if t.state == TrialState.FAIL]
    assert failed and all(
        client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FAILED"
        for t in failed
        if "mlflow_run_id" in t.user_attrs
    )
    if point == "created":  # killed before its worker claimed it: failed all the same
        assert any(t.user_attrs.get("failure") == "worker process died before it claimed the trial" for t in failed)


@pytest.fixture
def postgres():
    cluster = PostgresCluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(real_data, tmp_path, postgres):
    """Two sweep commands started by hand against one PostgreSQL study: no trial lost or run twice."""
    tracking = ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]  # one MLflow store, as with a server
    commands = [
        subprocess.Popen(
            [
                *SWEEP,
                *sweep_args(
                    real_data,
                    tmp_path / f"w{i}",
                    "--storage",
                    postgres,
                    "--n-trials",
                    "3",
                    "--n-jobs",
                    "1",
                    "--max-epochs",
                    "5",
                ),
                *tracking,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [c.communicate(timeout=600)[0] for c in commands]
    assert [c.returncode for c in commands] == [0, 0], "\n".join(o[-1500:] for o in outputs)
    study = trials(postgres)
    numbers = [t.number for t in study]
    assert sorted(numbers) == list(range(6))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study)
    # each trial was run by exactly one of the two processes
    pids = {t.user_attrs["worker"]["pid"] for t in study}
    assert len(pids) == 2
    assert len({t.user_attrs["mlflow_run_id"] for t in study}) == 6
    assert len({tuple(sorted(t.params.items())) for t in study}) == 6  # the two commands did not repeat each other
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("house-prices").experiment_id], max_results=100)
    assert sum(r.data.tags.get("trial_number") is not None for r in runs) == 6


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_run_whose_id_never_reached_its_trial_is_failed_with_it(tmp_path):
    """A worker killed between creating a trial's MLflow run and recording the run's id on the trial:
    recovery finds the run by its study and trial number, and fails it with the trial."""
    study = optuna.create_study(study_name="s", storage=make_storage(f"sqlite:///{tmp_path / 'optuna.db'}"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "e")
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": 2**22 + 1})
    orphan = tracker.start_run("trial-0", tags={"trial_number": "0", "study": "s"})
    other = tracker.start_run("trial-0", tags={"trial_number": "0", "study": "another study"})
    assert recover_stale_trials(study, tracker) == [0]
    assert tracker.run_status(orphan) == "FAILED" and tracker.run_status(other) == "RUNNING"
    assert tracker.client.get_run(orphan).data.tags["failure"] == "worker process died"
