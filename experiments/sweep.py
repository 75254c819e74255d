"""Optuna sweep under K-fold CV, tracked in MLflow: the main job of the template.

    python experiments/sweep.py                         # House Prices, 5 folds, resumable study
    python experiments/sweep.py --n-trials 2            # two more trials in the same study
    python experiments/sweep.py --task fashion-mnist    # one stratified validation fold, see README

Running the same command again resumes the study stored in --storage.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import uuid

from optuna.trial import TrialState
from tqdm import tqdm

from project.cli import (
    add_common_arguments,
    fixed_params,
    load_task,
    output_dir,
    positive_float,
    positive_int,
    run_name,
)
from project.config import to_yaml
from project.data import DataError
from project.sweep.export import ENSEMBLES, export_best, study_summary
from project.sweep.recovery import recover_stale_trials
from project.sweep.space import start_point
from project.sweep.study import (
    STORAGE_ERRORS,
    STORAGE_SCHEMES,
    StorageUnreachable,
    SweepSettings,
    WorkerCouldNotWrite,
    check_frozen,
    default_storage,
    open_study,
    run_workers,
)
from project.tracking.journal import PENDING_PREFIX
from project.tracking.tracker import Tracker, dataset_inputs, environment_tags, resolve_tracking_uri
from project.utils import files, stopping
from project.utils.devices import default_workers, visible_gpus
from project.utils.files import WriteFailed
from project.utils.output import quiet_libraries
from project.utils.stopping import Interrupted

PARENT_ATTR = "mlflow_parent_run_id"


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--n-trials",
        type=positive_int,
        default=None,
        help="trials this invocation runs (default: the preset's sweep.trials)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=None, help="stop starting trials after this many seconds"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: sqlite:///<output-dir>/optuna.db; postgresql://... for many machines)",
    )
    parser.add_argument("--study-name", default=None, help="study to create or resume (default: the task name)")
    parser.add_argument(
        "--n-jobs",
        type=positive_int,
        default=None,
        help="worker processes sharing the study (default: the preset's sweep.jobs, else two per GPU, "
        "each pinned to one GPU, else one per CPU core)",
    )
    parser.add_argument(
        "--validation-folds",
        type=positive_int,
        default=None,
        help="how many of the folds each trial trains and scores "
        "(default: the preset's sweep.validation_folds, else all)",
    )
    parser.add_argument("--no-pruning", action="store_true", help="run every trial to its last epoch")
    parser.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default="greedy",
        help="the submission: an ensemble of the study's trials and the preset's sweep.estimators, "
        "selected on their out-of-fold predictions (greedy), of the trials alone (trials), or "
        "the best trial alone (none) (default: %(default)s)",
    )
    return parser.parse_args(argv), parser


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


def main(argv: list[str] | None = None) -> int:
    with stopping.handling_signals():  # Ctrl-C or SIGTERM: a clean stop, see project/utils/stopping.py
        return run_sweep(argv)


def run_sweep(argv: list[str] | None) -> int:
    args, parser = parse_args(argv)
    quiet_libraries(args.verbose)
    task, model = load_task(args, parser)
    name = run_name(task, model)
    out = output_dir(args, parser, name)
    storage = args.storage or default_storage(out)
    if not storage.startswith(STORAGE_SCHEMES):
        parser.error(
            f"argument --storage: unknown scheme in {storage!r}; expected sqlite:///PATH, "
            "postgresql://..., mysql://... or journal:PATH"
        )
    sweep = task.preset.sweep
    n_trials = args.n_trials or sweep.trials
    n_jobs = min(args.n_jobs or sweep.jobs or default_workers(os.cpu_count() or 1, len(visible_gpus())), n_trials)
    settings = SweepSettings(
        preset=task.preset.resolved(),
        data_dir=str(args.data_dir),
        seed=args.seed,
        storage=storage,
        study_name=args.study_name or name,
        tracking_uri="",
        experiment_name=args.experiment_name or task.name,
        model=model,
        fixed=fixed_params(args),
        stacking="sequential" if args.sequential_folds else "auto",
        pruning=sweep.pruning and not args.no_pruning,
        validation_folds=args.validation_folds or sweep.validation_folds or task.folds,
        threads=args.threads or max(1, (os.cpu_count() or 1) // n_jobs),
        entry_point=__file__,
        output_dir=str(out),
        command=uuid.uuid4().hex,
        ensemble=args.ensemble,
        verbose=args.verbose,
    )
    if settings.validation_folds > settings.folds:
        parser.error(
            f"argument --validation-folds: {settings.validation_folds} is more than the {settings.folds} folds"
        )

    settings.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    tracker = settings.tracker()
    tracker.send_kept()  # what an earlier command could not log
    try:
        study = open_study(settings)
    except Exception as err:  # noqa: BLE001 - an unreachable or foreign database: name it and stop before any work
        parser.error(f"argument --storage: cannot open {storage}: {str(err).splitlines()[0]}")
    try:
        check_frozen(study, settings)
    except ValueError as err:
        parser.error(str(err))
    if study.user_attrs.get(PARENT_ATTR, "").startswith(PENDING_PREFIX):  # its run exists now
        study.set_user_attr(PARENT_ATTR, tracker.journal.resolve(study.user_attrs[PARENT_ATTR]))
    recovered = recover_stale_trials(study, tracker)
    if recovered:
        print(f"marked FAIL {len(recovered)} trial(s) left RUNNING by a dead worker: {recovered}")
    try:
        datamodule = settings.datamodule(task)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    settings.parent_run_id = parent_run(study, tracker, settings, datamodule)

    before = len(study.trials)
    if before == 0:
        study.enqueue_trial(start_point(task, model, settings.fixed))
    print(
        f"study {settings.study_name!r} in {storage}: {before} trial(s) so far; running {n_trials} more "
        f"with {n_jobs} worker(s), {settings.validation_folds} of {settings.folds} folds per trial"
    )
    progress = Progress(study, before, n_trials, task.metric)
    progress.start()
    started = time.perf_counter()
    try:
        lost = run_workers(settings, n_trials, n_jobs, args.timeout, tracker)
    except DataError as err:
        progress.stop()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Interrupted as err:
        progress.stop()
        return stopped(err, study, settings, tracker, out)
    except (WriteFailed, WorkerCouldNotWrite) as err:
        progress.stop()
        return could_not_write(err, settings, tracker, out)
    except StorageUnreachable as err:
        progress.stop()
        tracker.set_tags(settings.parent_run_id, {"failure": str(err)})
        tracker.end_run(settings.parent_run_id, "FAILED")
        tracker.send_kept(left_for="the next command on this study")
        print(
            f"error: {err}; the study is as its database holds it: the trials running then are failed by "
            "the next command on it",
            file=sys.stderr,
        )
        return 1
    finally:
        if progress.is_alive():
            progress.stop()
    elapsed = time.perf_counter() - started

    try:
        summary = export_best(study, settings, tracker, out, settings.parent_run_id)
    except Interrupted as err:
        return stopped(err, study, settings, tracker, out)
    except WriteFailed as err:
        return could_not_write(err, settings, tracker, out)
    tracker.end_run(settings.parent_run_id, "FAILED" if lost else "FINISHED")
    tracker.send_kept(left_for="the next command on this study")
    states = {
        s.name: sum(t.state == s for t in study.trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    print(
        f"\n{n_trials} trial(s) in {elapsed:.0f}s, the export in {time.perf_counter() - started - elapsed:.0f}s; "
        f"study totals: {states}"
    )
    print(f"best trial {summary['best_trial']}: cv_{task.metric} {summary['cv_mean']:.5f} ± {summary['cv_std']:.5f}")
    print("best params: " + ", ".join(f"{k}={v}" for k, v in summary["best_params"].items()))
    for name, estimator in summary.get("estimators", {}).items():
        print(
            f"estimator {name} ({estimator['estimator']}): cv_{task.metric} {estimator[f'cv_{task.metric}']:.5f}, "
            f"fitted in {estimator['seconds']:.0f}s"
        )
    ensemble = summary.get("ensemble", {})
    if f"oof_{task.metric}" in ensemble:
        members = ", ".join(f"{member_label(m)} × {m['weight']:.2f}" for m in ensemble["members"])
        beside = f" and {len(ensemble['estimators'])} estimator(s)" if ensemble.get("estimators") else ""
        print(
            f"ensemble of {len(ensemble['members'])} chosen from {ensemble['library']} trial(s){beside}: {members}; "
            f"cv_{task.metric} {ensemble[f'cv_{task.metric}']:.5f} (the best trial's {summary['cv_mean']:.5f}); "
            f"pooled out-of-fold {ensemble[f'oof_{task.metric}']:.5f} (the best trial's "
            f"{ensemble[f'best_trial_oof_{task.metric}']:.5f}); chosen on these folds, so optimistic"
        )
        if ensemble[f"held_out_cv_{task.metric}"] is not None:
            print(
                f"each fold scored by the ensemble selected on the other folds: cv_{task.metric} "
                f"{ensemble[f'held_out_cv_{task.metric}']:.5f}"
            )
    refit = ensemble.get("refit")
    weighted = ", ".join(f"{m['trial']} × {m['weight']:.2f}" for m in refit or [])
    made_of = f"the weighted average of trials {weighted}, one seed each" if refit else "the average of {} seeds"
    for key, value in summary.items():
        if key.startswith("test_") and not key.endswith("_members"):
            alone = ", ".join(f"{a:.4f}" for a in summary[f"{key}_members"])
            print(
                f"refit on every training row, {key.replace('_', ' ')} {value:.4f} "
                f"({made_of.format(len(summary[f'{key}_members']))}; each alone: {alone})"
            )
    print(f"submission: {summary['submission']}")
    print(f"summary: {out / 'summary.json'}\nplots:   {out / 'plots'}")
    print(f"MLflow:  {tracker.ui_command()}")
    if lost:
        print(
            f"error: {len(lost)} worker process(es) lost, their trials failed: " + "; ".join(map(str, lost)),
            file=sys.stderr,
        )
    return 1 if lost or summary.get("estimator_errors") else 0


def member_label(member: dict) -> str:
    return f"trial {member['trial']}" if "trial" in member else member["estimator"]


def could_not_write(err: Exception, settings: SweepSettings, tracker: Tracker, out) -> int:
    """A file that could not be written (a full disk, a read-only folder): the study's run ends
    FAILED with the reason; the finished trials stay in the study, for the export to finish from."""
    tracker.set_tags(settings.parent_run_id, {"failure": str(err)})
    tracker.end_run(settings.parent_run_id, "FAILED")
    tracker.send_kept(left_for="the next command on this study")
    print(
        f"error: {err}; the finished trials are kept in the study: once there is room, "
        f"`python experiments/export_submission.py --output-dir {out}` (or this command again) writes the rest",
        file=sys.stderr,
    )
    return 1


def stopped(err: Interrupted, study, settings: SweepSettings, tracker: Tracker, out) -> int:
    """A stop on request: the running trials ended FAIL ("interrupted") with KILLED runs; end the
    study's run and write what the study holds."""
    summary = {
        **study_summary(study, settings),
        "interrupted": str(err),
        "mlflow": {
            "tracking_uri": tracker.tracking_uri,
            "experiment_id": tracker.experiment_id,
            "run_id": settings.parent_run_id,
        },
    }
    files.write_json(out / "summary.json", summary, "the summary")
    tracker.set_tags(settings.parent_run_id, {"interrupted": str(err)})
    tracker.end_run(settings.parent_run_id, "KILLED")
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


if __name__ == "__main__":
    sys.exit(main())
