"""``sweep.py`` with a kill -9 of its whole process group at a chosen point of a trial's life.

    FAULT=created python tests/fault_sweep.py [sweep.py flags]

The point is reached in the first trial numbered ``FAULT_TRIAL`` (default 4) or later, by whichever
worker gets there first. Worker processes are spawned, and a spawned process imports this file as
its ``__mp_main__``, so the patches below are in place in every worker too.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

from project.sweep import pruning, study  # noqa: E402
from project.tracking.tracker import Tracker  # noqa: E402

POINT, FIRST = os.environ.get("FAULT", ""), int(os.environ.get("FAULT_TRIAL", "4"))
current: list[int] = [-1]  # the trial this process is running


def kill_all() -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def patch(owner, name: str, before=None, after=None) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if before:
            before(*args, **kwargs)
        result = original(*args, **kwargs)
        if after:
            after(*args, **kwargs)
        return result

    setattr(owner, name, wrapper)


def remember(objective, trial) -> None:
    current[0] = trial.number


def at_creation(_study, trial) -> None:
    if trial.number >= FIRST:
        kill_all()


def mid_fold(_callback, trainer, _module) -> None:
    if current[0] >= FIRST and trainer.current_epoch >= 5:
        kill_all()


def while_logging(tracker, run_id, *_args) -> None:
    if current[0] >= FIRST:
        tracker.log_metrics(run_id, {"partial": 1.0})
        kill_all()


def after_run_ended(_tracker, _run_id, *_args) -> None:
    if current[0] >= FIRST:
        kill_all()


patch(study.Objective, "__call__", before=remember)
if POINT == "created":  # the trial exists in the storage, and its worker has not claimed it yet
    patch(study, "claim", before=at_creation)
elif POINT == "mid-fold":  # some epochs into training the folds
    patch(pruning.FoldPruningCallback, "on_validation_end", after=mid_fold)
elif POINT == "logging":  # the trial's MLflow run holds some of its metrics
    patch(Tracker, "log_cv", before=while_logging)
elif POINT == "run-ended":  # MLflow says FINISHED; Optuna has not recorded the trial's end
    patch(Tracker, "end_run", after=after_run_ended)
elif POINT:
    raise SystemExit(f"FAULT={POINT!r}: unknown point")

if __name__ == "__main__":
    import sweep

    sys.exit(sweep.main())
