"""Stops users ask for, and workers that die: Ctrl-C (SIGINT to the process group, as a terminal
sends it), SIGTERM to the command alone (as a scheduler or `timeout` sends it), kill -9 of one
worker. Real processes on the real House Prices data; the states in Optuna and MLflow afterwards."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from project.config import TrainConfig
from project.cv import cross_validate
from project.utils import stopping
from tests.conftest import house_task_dm
from tests.test_reliability import SWEEP, sweep_args, trials, wait_for

REPO = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(REPO / "experiments" / "train.py")]


def start(command: list[str]) -> subprocess.Popen:
    """A command in a session of its own, with SIGINT as a terminal's child has it."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def running_after_finished(storage: str, finished: int):
    """True once ``finished`` trials have ended and another has trained for a moment."""

    def ready() -> bool:
        now = trials(storage)
        return sum(t.state.is_finished() for t in now) >= finished and any(
            t.state == TrialState.RUNNING and "worker" in t.user_attrs and "mlflow_run_id" in t.user_attrs for t in now
        )

    return ready


def runs(tmp_path: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("house-prices")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def counts(study_trials: list, mlflow_runs: list) -> str:
    """Trials by state and runs by status, for the figures a test prints."""
    states = collections.Counter(t.state.name for t in study_trials)
    statuses = collections.Counter(r.info.status for r in mlflow_runs)
    return f"trials {dict(states)}, MLflow runs {dict(statuses)}"


class SignalAfterStep(L.Callback):
    """Sends this process a signal after the given training step, as a terminal would."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum, self.steps = step, signum, 0

    def on_train_batch_end(self, *args) -> None:
        self.steps += 1
        if self.steps == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_request_ends_a_fit_after_its_current_step(house_dir, signum, capsys):
    task, dm = house_task_dm(house_dir)
    signaller = SignalAfterStep(3, signum)
    before = signal.getsignal(signum)
    with stopping.handling_signals(), pytest.raises(stopping.Interrupted) as stop:
        cross_validate(
            task,
            TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=50, batch_size=8),
            datamodule=dm,
            callbacks=[signaller],
        )
    assert stop.value.exit_code == 128 + signum and signaller.steps == 3  # no step after the one signalled
    assert f"{signal.Signals(signum).name}: stopping after the current step" in capsys.readouterr().err
    assert signal.getsignal(signum) is before and stopping.requested() is None  # as it was, for what runs next


LONG = ("--max-epochs", "150", "--no-pruning")  # trials of several seconds, so a stop lands mid-trial


@pytest.mark.slow
@pytest.mark.parametrize(
    "jobs, signum, group",
    [(1, signal.SIGINT, True), (2, signal.SIGINT, True), (2, signal.SIGTERM, False)],
    ids=["ctrl-c", "ctrl-c-2-workers", "sigterm-2-workers"],
)
def test_a_stop_request_ends_the_sweep_cleanly(real_data, tmp_path, jobs, signum, group):
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    sweep = start([*SWEEP, *sweep_args(real_data, tmp_path, "--n-trials", "200", "--n-jobs", str(jobs), *LONG)])
    try:
        wait_for(running_after_finished(storage, 1), 240)
        time.sleep(1.0)
        signalled = time.monotonic()
        (os.killpg if group else os.kill)(sweep.pid, signum)
        out, err = sweep.communicate(timeout=60)
        seconds = time.monotonic() - signalled
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    assert f"{signal.Signals(signum).name}: stopping" in err and "stopped, interrupted by" in err
    after = trials(storage)
    print(
        f"\n{signal.Signals(signum).name}, {jobs} worker(s): stopped {seconds:.1f} s after the signal; "
        f"{counts(after, runs(tmp_path)[1])}"
    )
    assert not [t.number for t in after if t.state == TrialState.RUNNING]
    interrupted = [t for t in after if t.user_attrs.get("failure") == "interrupted"]
    assert 1 <= len(interrupted) <= jobs and all(t.state == TrialState.FAIL for t in interrupted)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] == f"interrupted by {signal.Signals(signum).name}"
    assert summary["n_complete"] == sum(t.state == TrialState.COMPLETE for t in after) >= 1

    client, all_runs = runs(tmp_path)
    assert not [r.info.run_name for r in all_runs if r.info.status == "RUNNING"]
    assert all(client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "KILLED" for t in interrupted)
    assert client.get_run(summary["mlflow"]["run_id"]).info.status == "KILLED"
    complete = [t for t in after if t.state == TrialState.COMPLETE]
    assert all(client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "FINISHED" for t in complete)

    # the same command resumes: nothing to recover, the study goes on
    rerun = subprocess.run(
        [*SWEEP, *sweep_args(real_data, tmp_path, "--n-trials", "1", "--n-jobs", "1", *LONG)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "left RUNNING" not in rerun.stdout and len(trials(storage)) == len(after) + 1


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(real_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    sweep = start([*SWEEP, *sweep_args(real_data, tmp_path, "--n-trials", "200", "--n-jobs", "2", *LONG)])
    try:
        wait_for(running_after_finished(storage, 1), 240)
        os.killpg(sweep.pid, signal.SIGINT)
        time.sleep(0.2)
        os.killpg(sweep.pid, signal.SIGINT)
        sweep.communicate(timeout=20)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130
    time.sleep(1.0)
    assert not live_processes_in_group(sweep.pid)  # no worker left behind


def live_processes_in_group(pgid: int) -> list[int]:
    """Processes of the group that are not zombies (dead, waiting to be reaped)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            live.append(int(stat.parent.name))
    return live


@pytest.mark.slow
def test_a_dead_worker_is_reported_and_the_others_finish(real_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    sweep = start([*SWEEP, *sweep_args(real_data, tmp_path, "--n-trials", "8", "--n-jobs", "2")])
    try:
        wait_for(running_after_finished(storage, 1), 240)
        victim = next(t for t in trials(storage) if t.state == TrialState.RUNNING and "worker" in t.user_attrs)
        pid = victim.user_attrs["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: trials(storage)[victim.number].state == TrialState.FAIL, 60)
        failed_after = time.monotonic() - killed
        _out, err = sweep.communicate(timeout=300)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 1 and "Traceback" not in err, err[-3000:]
    assert f"(pid {pid}) was killed by SIGKILL during trial {victim.number}: that trial is FAIL" in err
    after = trials(storage)
    assert after[victim.number].state == TrialState.FAIL
    assert after[victim.number].user_attrs["failure"] == "worker process killed by SIGKILL"
    assert not [t.number for t in after if t.state == TrialState.RUNNING]
    survivor_share = 4  # the other worker's share of the 8 trials, all run
    assert (
        sum(t.state.is_finished() and t.user_attrs.get("worker", {}).get("pid") != pid for t in after) == survivor_share
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())  # the exports of what finished
    assert Path(summary["submission"]).is_file() and summary["n_failed"] >= 1
    client, all_runs = runs(tmp_path)
    assert client.get_run(victim.user_attrs["mlflow_run_id"]).info.status == "FAILED"
    assert not [r.info.run_name for r in all_runs if r.info.status == "RUNNING"]
    assert client.get_run(summary["mlflow"]["run_id"]).info.status == "FAILED"
    print(
        f"\nworker killed during trial {victim.number}: FAIL in Optuna {failed_after:.1f} s later; "
        f"{counts(after, all_runs)}"
    )


@pytest.mark.slow
def test_ctrl_c_stops_train_py_cleanly(real_data, tmp_path):
    train = start([*TRAIN, *sweep_args(real_data, tmp_path, "--max-epochs", "5000")])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def training() -> bool:
        experiment = client.get_experiment_by_name("house-prices")
        return experiment is not None and bool(client.search_runs([experiment.experiment_id]))

    try:
        wait_for(training, 120)
        time.sleep(3.0)
        os.killpg(train.pid, signal.SIGINT)
        _out, err = train.communicate(timeout=60)
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
    assert train.returncode == 130 and "Traceback" not in err, err[-3000:]
    (run,) = runs(tmp_path)[1]
    assert run.info.status == "KILLED" and run.data.tags["failure"] == "interrupted"
