"""The Optuna study: storage, the sampler, the objective and the worker processes."""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

import optuna
import sqlalchemy
import torch
from optuna.storages import RDBStorage

from project.config import from_resolved
from project.cv import TrainingDiverged, cross_validate
from project.sweep.kept import keep_trial
from project.sweep.pruning import FoldPruningCallback, make_pruner
from project.sweep.recovery import RUN_ID_ATTR, claim, fail_trials_of, recover_stale_trials
from project.sweep.space import suggest_config
from project.tasks import Task
from project.tracking.logger import run_loggers
from project.tracking.tracker import Tracker, dataset_inputs, source_tags
from project.utils import stopping
from project.utils.devices import describe, pin_to, training_device, visible_gpus, worker_gpus
from project.utils.files import WriteFailed
from project.utils.locks import sqlite_creation_lock
from project.utils.output import quiet_libraries
from project.utils.seeds import derive_seed
from project.utils.stopping import Interrupted

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
# settings a resumed study must share with the one that created it: its trials would not compare
FROZEN = ("model", "validation_folds", "seed", "fixed", "stacking")
FROZEN_PRESET = ("name", "kind", "metric", "metric_scale", "folds", "data")
PRESET_ATTR = "preset"
STORAGE_SCHEMES = ("sqlite:", "postgresql", "mysql", "journal:")


@dataclass
class SweepSettings:
    """Everything a worker process needs; plain values so it pickles into a spawned process. The
    task is its resolved preset, so every worker builds the same task without reading a file."""

    preset: dict  # Preset.resolved()
    data_dir: str
    seed: int
    storage: str
    study_name: str
    tracking_uri: str
    experiment_name: str
    model: str = "mlp"
    fixed: dict = field(default_factory=dict)  # search keys (lr, model.dropout) fixed on the command line
    stacking: str = "auto"  # how folds train: see cross_validate
    validation_folds: int = 0  # train and score folds 0..validation_folds-1 of the K (0: all K)
    pruning: bool = True
    threads: int | None = None
    parent_run_id: str | None = None
    entry_point: str | None = None  # the script the runs name as their source (default: this process's)
    # the trials' out-of-fold predictions go to <output_dir>/predictions/, and MLflow writes wait in
    # <output_dir>/mlflow-pending/ while the tracking server is unreachable
    output_dir: str | None = None
    command: str = ""  # this command's id: its processes say an outage once between them
    ensemble: str = "greedy"  # what export makes of the study: see export.py
    verbose: bool = False  # the libraries' INFO lines too (project/utils/output.py)

    @classmethod
    def of_study(cls, study: optuna.Study, storage: str, data_dir: str, output_dir: str, **kwargs) -> SweepSettings:
        """The settings a stored study was created with (``check_frozen``), to export or replay it;
        a study stored without its preset raises ``KeyError``."""
        stored, preset = study.user_attrs.get("settings", {}), study.user_attrs[PRESET_ATTR]
        return cls(
            preset=preset,
            data_dir=data_dir,
            seed=stored["seed"],
            storage=storage,
            study_name=study.study_name,
            tracking_uri="",
            experiment_name=preset["name"],
            model=stored["model"],
            fixed=stored["fixed"],
            stacking=stored["stacking"],
            validation_folds=stored["validation_folds"],
            output_dir=output_dir,
            **kwargs,
        )

    def tracker(self) -> Tracker:
        pending = Path(self.output_dir) / "mlflow-pending" if self.output_dir else None
        return Tracker(self.tracking_uri, self.experiment_name, pending=pending, command=self.command or None)

    @property
    def task(self) -> Task:
        return Task(from_resolved(self.preset))

    @property
    def folds(self) -> int:
        return self.preset["folds"]

    def datamodule(self, task: Task | None = None):
        """The set-up DataModule stacking the folds every trial trains and scores."""
        folds = list(range(self.validation_folds or self.folds))
        datamodule = (task or self.task).prepared(self.data_dir, fold=folds, seed=self.seed)
        return datamodule


class StorageUnreachable(Exception):
    """The study's database server stopped answering (``--storage``)."""

    def __init__(self, url: str, err: BaseException) -> None:
        super().__init__(f"--storage {url} is unreachable ({str(err).strip().splitlines()[0][:160]})")


# what a database server that has gone away raises: SQLAlchemy's error, or Optuna's around it
STORAGE_ERRORS = (sqlalchemy.exc.DBAPIError, optuna.exceptions.StorageInternalError)


def storage_error_in(err: BaseException | None) -> BaseException | None:
    """The database driver's error behind ``err``, if a database error is behind it (Optuna wraps
    it, and may raise another error while handling it)."""
    found = None
    while err is not None:
        if isinstance(err, sqlalchemy.exc.DBAPIError):
            return err.orig or err
        if isinstance(err, optuna.exceptions.StorageInternalError):
            found = err
        err = err.__cause__ or err.__context__
    return found


# a worker's exit code when it lost the study's database (EX_TEMPFAIL): the coordinator says so once
STORAGE_LOST = 75
# a worker's exit code when a file could not be written (EX_IOERR): the coordinator says which, once
OUTPUT_LOST = 74


class TrialFailed(Exception):
    """A trial's own error (its model, its configuration, its data): the trial ends FAIL with the
    error recorded in one line, and its worker goes on to the next trial."""


def one_line(err: BaseException) -> str:
    """``StackingError: BatchNorm1d at 'body.2' keeps running statistics, ...``"""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class WorkerCouldNotWrite(Exception):
    """A worker process could not write a trial's files (a full disk, a read-only folder): what its
    trial recorded, which names the path."""


CONNECT_TIMEOUT = 10  # seconds to reach a database server before saying it is unreachable


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB URLs (SQLite, PostgreSQL, MySQL) get a heartbeat so a killed worker's trial is failed;
    a database server has ``CONNECT_TIMEOUT`` seconds to answer each new connection."""
    if url.startswith(("sqlite:", "postgresql", "mysql")):
        server = {"pool_pre_ping": True, "connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
        return RDBStorage(
            url, heartbeat_interval=10, grace_period=30, engine_kwargs=None if url.startswith("sqlite:") else server
        )
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    raise ValueError(
        f"storage {url!r}: unknown scheme; expected sqlite:///PATH, postgresql://..., mysql://... or journal:PATH"
    )


class TrialSeededTPE(optuna.samplers.TPESampler):
    """TPE whose random state is reseeded from (seed, trial number) before each trial, and which
    records this process as the trial's worker the moment the trial exists (see recovery.py).

    One process gives the same sweep for the same --seed, and workers sharing a study, even
    commands started by hand with the same --seed, hold different trial numbers and so do not
    draw the same configurations.
    """

    def __init__(self, seed: int, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        claim(study, trial)
        self.reseed(derive_seed(self._base_seed, "trial", trial.number))
        super().before_trial(study, trial)

    def reseed(self, seed: int) -> None:
        """TPE's generators, and those of the random sampler it starts with, from ``seed``: Optuna's
        public ``reseed_rng()`` draws a fresh seed, so these private ones are set here alone."""
        self._rng.rng.seed(seed)
        self._random_sampler._rng.rng.seed(seed)


def open_study(settings: SweepSettings, attempts: int = 5) -> optuna.Study:
    """Create or load the study. Commands started together against a new database race to create
    its tables: SQLite is created under a file lock; on a database server the loser retries."""
    for attempt in range(attempts):
        try:
            with sqlite_creation_lock(settings.storage):
                return _create_or_load(settings)
        except sqlalchemy.exc.SQLAlchemyError as err:
            if attempt == attempts - 1 or _connection_failed(err):
                raise
            time.sleep(1.0 + attempt)
    raise AssertionError("unreachable")


def _connection_failed(err: sqlalchemy.exc.SQLAlchemyError) -> bool:
    """The database server could not be reached (no race to retry: it would only wait longer)."""
    text = str(err).lower()
    return isinstance(err, sqlalchemy.exc.OperationalError) and any(
        s in text
        for s in (
            "could not connect",
            "connection refused",
            "timeout expired",
            "can't connect",
            "could not translate host name",
            "server closed the connection",
        )
    )


def _create_or_load(settings: SweepSettings) -> optuna.Study:
    task = settings.task
    return optuna.create_study(
        storage=make_storage(settings.storage),
        study_name=settings.study_name,
        direction=task.direction,
        # constant_liar: running trials count as bad, so parallel workers spread out
        sampler=TrialSeededTPE(settings.seed, n_startup_trials=8, multivariate=True, constant_liar=True),
        pruner=make_pruner() if settings.pruning else optuna.pruners.NopPruner(),
        load_if_exists=True,
    )


def check_frozen(study: optuna.Study, settings: SweepSettings) -> None:
    """Store the settings and the resolved preset on a new study; refuse to resume one created
    with different ones (its trials would not compare)."""
    current = {k: v for k, v in asdict(settings).items() if k in FROZEN}
    current["fixed"] = {k: list(v) if isinstance(v, tuple) else v for k, v in current["fixed"].items()}
    current.update({f"preset.{k}": settings.preset[k] for k in FROZEN_PRESET})
    current = json.loads(json.dumps(current))  # as the storage keeps it: tuples become lists
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", current)
        study.set_user_attr(PRESET_ATTR, settings.preset)
        return
    for key, value in current.items():
        if stored.get(key) != value:
            flag = (
                "the preset"
                if key.startswith("preset.")
                else "the fixed-value flags"
                if key == "fixed"
                else "--" + key.replace("_", "-")
            )
            raise ValueError(
                f"study {settings.study_name!r} was created with {key}={stored.get(key)!r}, "
                f"this run has {value!r} ({flag}); give --study-name a new name to start a new study"
            )


class Objective:
    """Mean validation score over the K folds; one MLflow child run per trial."""

    def __init__(self, settings: SweepSettings, tracker: Tracker) -> None:
        self.settings, self.tracker = settings, tracker
        self.task = settings.task
        # set up once per worker: preprocessing does not depend on the trial
        self.datamodule = settings.datamodule(self.task)
        self.inputs, self.source = dataset_inputs(self.datamodule), source_tags(settings.entry_point)
        # where a fit's checkpoints go, unless a callback or the preset's trainer says otherwise
        self.lightning_dir = Path(settings.output_dir) / "lightning" if settings.output_dir else None

    def __call__(self, trial: optuna.Trial) -> float:
        config = suggest_config(trial, self.task, self.settings.model, self.settings.fixed)
        run_id = self.tracker.start_run(
            f"trial-{trial.number}",
            self.settings.parent_run_id,
            {"trial_number": str(trial.number), "study": self.settings.study_name, **self.source},
        )
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        self.tracker.log_inputs(run_id, self.inputs)
        self.tracker.log_params(run_id, {**config.flat(), "trial_number": trial.number})
        pruner = FoldPruningCallback(trial)
        state, status = "FAIL", "FAILED"
        try:
            stopping.check()  # asked to stop while this trial was being created: it ends before training
            result = cross_validate(
                self.task,
                config,
                seed=self.settings.seed,
                stacking=self.settings.stacking,
                callbacks=[pruner],
                datamodule=self.datamodule,
                loggers=run_loggers(self.tracker, run_id, f"trial-{trial.number}", self.lightning_dir),
            )
            self.tracker.log_cv(run_id, result, self.datamodule.folds)
            self.tracker.set_tags(
                run_id,
                {
                    "fold_layout": result.layout,
                    "benchmark": str(self.task.preset.benchmark).lower(),
                    "device": describe(training_device()),
                },
            )
            self.tracker.log_metrics(run_id, {"seconds": result.seconds})
            trial.set_user_attr("fold_scores", result.fold_scores)
            trial.set_user_attr("cv_std", result.std)
            trial.set_user_attr("seconds", result.seconds)
            if pruner.stopped:
                state, status = "PRUNED", "FINISHED"
                raise optuna.TrialPruned(f"pruned after epoch {len(result.history[0]) - 1}")
            if self.settings.output_dir:
                keep_trial(
                    trial,
                    self.task,
                    config,
                    result,
                    self.datamodule,
                    Path(self.settings.output_dir),
                    self.tracker,
                    run_id,
                )
            state, status = "COMPLETE", "FINISHED"
            return result.mean
        except (TrainingDiverged, WriteFailed) as err:
            trial.set_user_attr("failure", str(err))
            self.tracker.set_tags(run_id, {"failure": str(err)})
            raise
        except Interrupted:
            state, status = "FAIL", "KILLED"
            trial.set_user_attr("failure", "interrupted")
            self.tracker.set_tags(run_id, {"failure": "interrupted"})
            raise
        except optuna.TrialPruned:
            raise
        except Exception as err:
            if storage_error_in(err) is not None:
                raise  # the study's database went away: a fault of the whole run, not of this trial
            failure = one_line(err)
            trial.set_user_attr("failure", failure)
            self.tracker.set_tags(run_id, {"failure": failure})
            self.tracker.log_text(run_id, traceback.format_exc(), "traceback.txt")
            raise TrialFailed(failure) from err
        finally:
            self.tracker.set_tags(run_id, {"state": state})
            self.tracker.end_run(run_id, status)


def run_worker(settings: SweepSettings, n_trials: int, timeout: float | None, tracker: Tracker | None = None) -> None:
    """One worker: its own process (or the coordinator's, with its ``tracker``), sharing the study
    storage and the MLflow store with the others. A stop request ends its running trial FAIL
    ("interrupted") and raises ``Interrupted``."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    threading.excepthook = _quiet_storage_loss
    tracker = tracker or settings.tracker()
    study = open_study(settings)
    objective = Objective(settings, tracker)
    stopping.check()
    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=timeout,
        catch=(TrainingDiverged, TrialFailed),
        gc_after_trial=False,
        callbacks=[_stop_when_asked],
    )


def _stop_when_asked(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    if stopping.requested():
        study.stop()


class _NotInterrupted(logging.Filter):
    """Optuna logs a failed trial with its traceback, then its value; an interrupted trial is no
    failure of the code, and the sweep's own line says it was interrupted. A diverged trial is no
    failure of the code either: its line, which names the fold and epoch, is kept, its traceback not.
    A trial that raised is said by the sweep's own line for it (its traceback is on its MLflow run)."""

    def __init__(self) -> None:
        super().__init__()
        self.said_by_the_command: set[str] = set()  # "Trial 3 failed with": Optuna's second line of it too

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], TrainingDiverged):
            record.exc_info, record.exc_text = None, None
        if record.exc_info and isinstance(record.exc_info[1], (WriteFailed, TrialFailed)):  # the command says it
            self.said_by_the_command.add(record.getMessage().partition(" parameters")[0])
            return False
        opening = record.getMessage().partition(" value")[0]
        if opening in self.said_by_the_command:
            self.said_by_the_command.discard(opening)
            return False
        return not stopping.requested()


logging.getLogger("optuna.study._optimize").addFilter(_NotInterrupted())


def _worker_process(settings: SweepSettings, n_trials: int, timeout: float | None, gpu: str | None) -> None:
    pin_to(gpu)
    quiet_libraries(settings.verbose)
    stopping.install_for_worker()
    try:
        run_worker(settings, n_trials, timeout)
    except Interrupted as err:
        sys.exit(err.exit_code)
    except WriteFailed:
        sys.exit(OUTPUT_LOST)  # the coordinator says it, from the trial's failure
    except Exception as err:
        if storage_error_in(err) is None:
            raise
        sys.exit(STORAGE_LOST)  # the coordinator says it once for every worker


def _quiet_storage_loss(args: threading.ExceptHookArgs) -> None:
    """Optuna's heartbeat thread ends on the error its trial's process stops on: no second traceback."""
    if storage_error_in(args.exc_value) is None:
        threading.__excepthook__(args)


@dataclass(frozen=True)
class LostWorker:
    """A worker process that ended by itself before its share was done (killed, or crashed)."""

    index: int
    pid: int
    how: str  # "killed by SIGKILL", "exited with code 1"
    trials: list[int]  # its RUNNING trials, failed at once

    def __str__(self) -> str:
        during = f"during trial {', '.join(map(str, self.trials))}" if self.trials else "between trials"
        return (
            f"worker {self.index} (pid {self.pid}) {self.how} {during}: "
            f"{'that trial is' if len(self.trials) == 1 else 'its trials are'} FAIL, the other workers go on"
        )


def run_workers(
    settings: SweepSettings, n_trials: int, n_jobs: int, timeout: float | None, tracker: Tracker
) -> list[LostWorker]:
    """Run the trials in ``n_jobs`` worker processes (or in this one). A worker that dies is
    reported at once, its trial failed in Optuna and MLflow, and the others go on; the lost
    workers are returned. A stop request is passed on to the workers, and raises ``Interrupted``
    here once they have ended their trials. ``tracker`` (the coordinator's, which has made the
    experiment: workers racing to do so collide) keeps sending its own kept writes meanwhile,
    such as the study's run that the trials' runs name as their parent."""
    if n_jobs == 1:
        with _storage_loss_raised(settings.storage):
            run_worker(settings, n_trials, timeout, tracker)
        return []
    study = open_study(settings)
    context = multiprocessing.get_context("spawn")
    shares = [n_trials // n_jobs + (i < n_trials % n_jobs) for i in range(n_jobs)]
    shares = [share for share in shares if share]
    workers = [
        context.Process(target=_worker_process, args=(settings, share, timeout, gpu))
        for share, gpu in zip(shares, worker_gpus(len(shares), visible_gpus()))
    ]
    for worker in workers:
        worker.start()
    lost, running = [], dict(enumerate(workers))
    try:
        with stopping.forwarding_to([cast(int, w.pid) for w in workers]), _storage_loss_raised(settings.storage):
            while running:
                multiprocessing.connection.wait([w.sentinel for w in running.values()], timeout=1.0)
                if tracker.journal is not None and tracker.journal.holding:
                    tracker.flush()
                for index, worker in list(running.items()):
                    if worker.exitcode is None:
                        continue
                    del running[index]
                    asked = stopping.requested()
                    # a worker stopped on request, or by the signal itself before its handler was set
                    stopped = asked is not None and worker.exitcode in (128 + asked, -asked)
                    if worker.exitcode == OUTPUT_LOST:
                        raise WorkerCouldNotWrite(_write_failure(study) or f"worker {index} could not write its files")
                    if worker.exitcode == STORAGE_LOST:
                        study.get_trials(deepcopy=False)  # raises what the database server answers now
                        raise StorageUnreachable(settings.storage, ConnectionError("a worker lost its connection"))
                    if worker.exitcode != 0 and not stopped:
                        lost.append(_lost(study, tracker, index, worker))
                        print(lost[-1], file=sys.stderr, flush=True)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
    if lost:  # a worker killed before it claimed its newest trial left that one unattributed
        recover_stale_trials(study, tracker)
    stopping.check()
    return lost


@contextlib.contextmanager
def _storage_loss_raised(url: str) -> Iterator[None]:
    """Calls to a database server that has gone away raise ``StorageUnreachable``, which names it."""
    try:
        yield
    except Exception as err:
        cause = storage_error_in(err)
        if cause is None:
            raise
        raise StorageUnreachable(url, cause) from None


def _write_failure(study: optuna.Study) -> str | None:
    """What the newest trial that could not write its files says of it."""
    failed = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        if str(t.user_attrs.get("failure", "")).startswith("cannot write")
    ]
    return failed[-1].user_attrs["failure"] if failed else None


def _lost(study: optuna.Study, tracker: Tracker, index: int, worker: BaseProcess) -> LostWorker:
    code, pid = cast(int, worker.exitcode), cast(int, worker.pid)  # a started process that ended
    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    trials = fail_trials_of(study, tracker, pid, f"worker process {how}")
    return LostWorker(index, pid, f"was {how}" if code < 0 else how, trials)


def default_storage(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'optuna.db').resolve()}"
