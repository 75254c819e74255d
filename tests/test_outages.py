"""Servers that go away under a running sweep: a real `mlflow server` killed and started again, a
real PostgreSQL study database stopped. Training goes on through a tracking outage and every run is
logged once the server is back, in the same command or the next; a lost study database stops the
sweep at once with one line naming --storage, and the next command recovers the study."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.servers import MlflowServer, PostgresCluster, free_port
from tests.test_reliability import REPO, SWEEP, sweep_args, trials, wait_for
from tests.test_stopping import counts, start

UNREACHABLE = "is unreachable"


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    server.kill()


def finished(storage: str) -> int:
    return sum(t.state.is_finished() for t in trials(storage))


def trial_runs(client: MlflowClient) -> dict[int, object]:
    """The study's trial runs by trial number."""
    experiment = client.get_experiment_by_name("house-prices")
    runs = client.search_runs([experiment.experiment_id], max_results=1000) if experiment else []
    return {int(r.data.tags["trial_number"]): r for r in runs if "trial_number" in r.data.tags}


def assert_every_trial_logged(storage: str, client: MlflowClient) -> None:
    """Each Optuna trial has its finished MLflow run under the study's run, COMPLETE ones with the
    CV score Optuna holds; nothing is left RUNNING."""
    study, runs = trials(storage), trial_runs(client)
    assert sorted(runs) == [t.number for t in study]
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    assert client.get_run(parents.pop()).info.status == "FINISHED"
    for trial in study:
        run = runs[trial.number]
        assert run.info.status == ("FINISHED" if trial.state != TrialState.FAIL else "FAILED"), trial.number
        if trial.state == TrialState.COMPLETE:
            assert run.data.metrics["cv_mean"] == pytest.approx(trial.value)
            assert client.get_metric_history(run.info.run_id, "train/loss/fold_0")  # the curves too


def run_with_fault(command: list[str], ready, fault, timeout: float = 600) -> tuple[int, str, str, float]:
    """Start ``command``, wait for ``ready()``, call ``fault()`` and let the command end: its exit
    code, output, error output, and the seconds from the fault to its end."""
    process = start(command)
    try:
        wait_for(ready, 240)
        fault()
        faulted = time.monotonic()
        out, err = process.communicate(timeout=timeout)
        return process.returncode, out, err, time.monotonic() - faulted
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)


def outage_args(real_data: Path, tmp_path: Path, server: MlflowServer, *extra: str) -> list[str]:
    return [*sweep_args(real_data, tmp_path, *extra), "--tracking-uri", server.uri]


@pytest.mark.slow
def test_a_tracking_outage_costs_no_trial_and_is_logged_once_the_server_is_back(real_data, tmp_path, server):
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    sweep = start([*SWEEP, *outage_args(real_data, tmp_path, server, "--n-trials", "30", "--n-jobs", "2")])
    try:
        wait_for(lambda: finished(storage) >= 2, 240)
        server.kill()
        fault, at_fault = time.monotonic(), finished(storage)
        wait_for(lambda: finished(storage) >= at_fault + 4, 240)  # training goes on without the server
        during = finished(storage) - at_fault
        server.start()
        back = time.monotonic()
        client = MlflowClient(server.uri)
        logged_at_fault = len(trial_runs(client))
        wait_for(lambda: len(trial_runs(client)) > logged_at_fault, 120)
        resumed = time.monotonic() - back
        _out, err = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, 9)
    assert sweep.returncode == 0, err[-3000:]
    assert err.count(UNREACHABLE) == 1 and server.uri in err  # said once, naming the server
    assert "Traceback" not in err
    assert_every_trial_logged(storage, client)
    assert not list((tmp_path / "out").glob("**/mlflow-pending/*.jsonl"))
    study = trials(storage)
    # no trial lost to the outage (a configuration whose loss diverged fails for its own reason)
    assert len(study) == 30 and not [
        t.number
        for t in study
        if t.state == TrialState.FAIL and "NaN or infinite" not in t.user_attrs.get("failure", "")
    ]
    versions = client.search_model_versions("name='house-prices'")
    assert [v.tags["trial"] for v in versions] == [
        str(optuna.load_study(study_name="house-prices", storage=storage).best_trial.number)
    ]
    experiment = client.get_experiment_by_name("house-prices")
    print(
        f"\nserver killed after {at_fault} finished trial(s), {logged_at_fault} trial runs in MLflow; {during} "
        f"finished during the outage of {back - fault:.1f} s; logging resumed {resumed:.1f} s after the server "
        f"was back; at the end {counts(study, client.search_runs([experiment.experiment_id], max_results=1000))}"
    )


@pytest.mark.slow
def test_what_an_outage_kept_is_logged_by_the_next_command(real_data, tmp_path, server):
    storage = f"sqlite:///{tmp_path / 'out' / 'optuna.db'}"
    command = [*SWEEP, *outage_args(real_data, tmp_path, server, "--n-trials", "6", "--n-jobs", "1")]
    code, out, err, ended = run_with_fault(command, lambda: finished(storage) >= 2, server.kill)
    assert code == 0, err[-3000:]
    assert err.count(UNREACHABLE) == 1 and "still unreachable" in err and "Traceback" not in err
    assert "submission:" in out and list((tmp_path / "out").glob("**/submission.csv"))
    kept = list((tmp_path / "out").glob("**/mlflow-pending/*.jsonl"))
    assert kept
    assert len(trials(storage)) == 6 and all(t.state.is_finished() for t in trials(storage))

    server.start()
    rerun = subprocess.run(
        [*SWEEP, *outage_args(real_data, tmp_path, server, "--n-trials", "1")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "MLflow write(s) kept while" in rerun.stdout
    client = MlflowClient(server.uri)
    assert_every_trial_logged(storage, client)
    assert not list((tmp_path / "out").glob("**/mlflow-pending/*.jsonl"))
    experiment = client.get_experiment_by_name("house-prices")
    print(
        f"\nserver killed after 2 trials; the sweep finished its 6 in {ended:.1f} s more without it; the next "
        f"command logged what was kept: {counts(trials(storage), client.search_runs([experiment.experiment_id]))}"
    )


@pytest.mark.slow
def test_an_unreachable_study_database_is_named_at_once(real_data, tmp_path):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/optuna"
    began = time.monotonic()
    sweep = subprocess.run(
        [*SWEEP, *sweep_args(real_data, tmp_path, "--storage", closed, "--n-trials", "2")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.monotonic() - began
    assert sweep.returncode == 2 and "--storage" in sweep.stderr and closed in sweep.stderr, sweep.stderr[-2000:]
    assert "Traceback" not in sweep.stderr
    print(f"\nan unreachable --storage refused in {took:.1f} s (start-up included)")


@pytest.mark.slow
def test_a_study_database_lost_mid_sweep_stops_it_and_the_next_command_recovers(real_data, tmp_path):
    cluster = PostgresCluster()
    try:
        args = sweep_args(real_data, tmp_path, "--storage", cluster.url, "--n-trials", "40", "--n-jobs", "2")
        before = {}

        def stop_database() -> None:
            before.update({t.number: t.state for t in trials(cluster.url) if t.state.is_finished()})
            cluster.stop()

        code, _out, err, stopped_after = run_with_fault(
            [*SWEEP, *args],
            lambda: finished(cluster.url) >= 2 and any(t.state == TrialState.RUNNING for t in trials(cluster.url)),
            stop_database,
            timeout=300,
        )
        assert code == 1, err[-3000:]
        assert err.count("--storage") == 1 and "unreachable" in err and "Traceback" not in err, err[-3000:]
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("house-prices")
        runs = client.search_runs([experiment.experiment_id], max_results=1000)
        assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        assert [r.info.status for r in runs if r.data.tags.get("kind") == "study"] == ["FAILED"]

        cluster.start()
        rerun = subprocess.run(
            [*SWEEP, *sweep_args(real_data, tmp_path, "--storage", cluster.url, "--n-trials", "1")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        after = trials(cluster.url)
        assert not [t.number for t in after if t.state == TrialState.RUNNING]
        assert all(after[n].state == state for n, state in before.items())
        print(
            f"\nstudy database stopped after {len(before)} finished trial(s): the sweep stopped {stopped_after:.1f} s "
            f"later; after the next command {counts(after, client.search_runs([experiment.experiment_id]))}"
        )
    finally:
        cluster.remove()
