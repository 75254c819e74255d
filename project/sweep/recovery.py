"""Which process runs a trial, and recovery of the trials that dead workers left RUNNING.

A worker records itself on a trial (one ``worker`` attribute: host and pid, written at once) from
the sampler's ``before_trial`` hook, the first moment Optuna hands a new trial to its creator. A
trial can still be killed between its creation and that write, so start-up recovery also fails
an unclaimed RUNNING trial once it is older than ``CLAIM_WITHIN`` seconds: a live worker claims its
trial within milliseconds (a SQLite write waits at most its 5 s busy timeout), so an older
unclaimed trial has no worker. A younger one is looked at again when it reaches that age.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from project.tracking.tracker import Tracker

WORKER_ATTR = "worker"
RUN_ID_ATTR = "mlflow_run_id"
CLAIM_WITHIN = 10.0  # seconds; the storage heartbeat's interval


def this_worker() -> dict[str, str | int]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def trial_record(study: optuna.Study, trial: FrozenTrial) -> tuple[BaseStorage, int]:
    """The study's storage and the trial's id in it, to write to a trial this process is not running.

    Optuna's public writes to a trial go through a ``Trial``, which exists only in the process that
    runs it and only once ``before_trial`` has returned; the storage API (public on the storage
    classes) does the rest, reached through the two private attributes here and nowhere else."""
    return study._storage, trial._trial_id


def claim(study: optuna.Study, trial: FrozenTrial) -> None:
    """Record this process as the trial's worker (one write, so it is never half-recorded)."""
    storage, trial_id = trial_record(study, trial)
    storage.set_trial_user_attr(trial_id, WORKER_ATTR, this_worker())


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or -1, ...) would signal a whole process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _why_dead(trial: FrozenTrial, host: str, now: datetime) -> str | None:
    """The reason ``trial`` has no live worker, or None while it may have one."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if worker is None:
        age = (now - trial.datetime_start).total_seconds() if trial.datetime_start else CLAIM_WITHIN
        return "worker process died before it claimed the trial" if age >= CLAIM_WITHIN else None
    if worker.get("host") == host and not _alive(int(worker.get("pid", 0))):
        return "worker process died"
    return None  # alive here, or on another host: left to the storage heartbeat


def _fail(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    storage, trial_id = trial_record(study, trial)
    try:
        storage.set_trial_user_attr(trial_id, "failure", reason)
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # its worker was alive after all and finished it meanwhile


def recover_stale_trials(study: optuna.Study, tracker: Tracker) -> list[int]:
    """Mark FAIL the RUNNING trials whose worker has died (kill -9, power loss), and their MLflow
    runs FAILED; returns their numbers. Waits at most ``CLAIM_WITHIN`` seconds, and only when a
    trial was created moments ago and is not claimed yet."""
    host, failed = socket.gethostname(), []
    numbers = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    while numbers:
        now, young = datetime.now(), set()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial.number not in numbers:
                continue  # started after this recovery began: a live worker's
            reason = _why_dead(trial, host, now)
            if reason is None:
                if WORKER_ATTR not in trial.user_attrs:
                    young.add(trial.number)
            elif _fail(study, trial, reason):
                failed.append(trial.number)
        numbers = young
        if numbers:
            time.sleep(1.0)
    _close_failed_runs(study, tracker)
    return sorted(failed)


def fail_trials_of(study: optuna.Study, tracker: Tracker, pid: int, reason: str) -> list[int]:
    """Mark FAIL the RUNNING trials this host's process ``pid`` claimed (it is known to have died),
    and their MLflow runs FAILED; returns their numbers."""
    host = socket.gethostname()
    failed = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get(WORKER_ATTR) == {"host": host, "pid": pid} and _fail(study, t, reason)
    ]
    _close_failed_runs(study, tracker)
    return failed


def _close_failed_runs(study: optuna.Study, tracker: Tracker) -> None:
    """FAIL trials, whether failed here or by the storage heartbeat, get FAILED MLflow runs: a run
    may still say RUNNING, or FINISHED when its worker died after ending it but before Optuna
    recorded the trial's end. An interrupted trial's run stays KILLED. A worker killed between
    creating a trial's run and recording the run's id on the trial leaves a run only its tags
    name: found among the RUNNING runs by its study and trial number."""
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    by_number = {str(t.number): t for t in failed}
    unrecorded = {
        run.info.run_id: by_number[run.data.tags["trial_number"]]
        for run in tracker.running_runs(study=study.study_name)
        if run.data.tags.get("trial_number") in by_number
        and RUN_ID_ATTR not in by_number[run.data.tags["trial_number"]].user_attrs
    }
    recorded = {t.user_attrs[RUN_ID_ATTR]: t for t in failed if RUN_ID_ATTR in t.user_attrs}
    for run_id, trial in {**recorded, **unrecorded}.items():
        if tracker.run_status(run_id) not in (None, "FAILED", "KILLED"):
            tracker.set_tags(run_id, {"state": "FAIL", "failure": trial.user_attrs.get("failure", "worker died")})
            tracker.end_run(run_id, "FAILED")
