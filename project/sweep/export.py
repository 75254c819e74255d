"""From a finished study to the deliverables: the best configuration re-run, the submission or the
test accuracy, the model, plots and summary.json, all logged on the study's MLflow run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from project.artifacts.predictor import Ensemble, EstimatorPredictor, Predicts
from project.artifacts.refit import Refit, refit_and_test, refit_metrics
from project.deliverables import deliver
from project.ensemble.estimators import EstimatorFailed, FittedEstimator, cross_fit
from project.ensemble.selection import Member, Predictions, blend, cv_score, held_out_score, scores, select
from project.sweep.kept import KeptTrials
from project.sweep.plots import learning_curves, study_plots
from project.sweep.recovery import RUN_ID_ATTR
from project.sweep.space import config_from_params
from project.sweep.study import SweepSettings
from project.tracking.journal import PENDING_PREFIX
from project.tracking.tracker import Tracker, dataset_inputs, source_tags

ESTIMATOR_RUN_ATTR = "mlflow_estimator_run_ids"


def member_entry(member: int | str, weight: float) -> dict:
    """How summary.json and the MLflow tags name an ensemble member: a trial by its number, an
    estimator by its name under the preset's ``sweep.estimators``."""
    return {"trial" if isinstance(member, int) else "estimator": member, "weight": weight}


class NoCompleteTrial(ValueError):
    """A study with nothing to export: why its first trial failed, where one did."""

    def __init__(self, study: optuna.Study) -> None:
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if failed:
            why = failed[0].user_attrs.get("failure", "no reason was recorded")
            super().__init__(f"no trial completed: trial {failed[0].number} failed: {why}")
        else:
            super().__init__(f"study {study.study_name!r} has no complete trial yet; run the sweep first")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise NoCompleteTrial(study)
    return study.best_trial


def study_summary(study: optuna.Study, settings: SweepSettings) -> dict:
    """What the study holds: its trial counts and, once a trial completed, the best one."""
    task, trials = settings.task, study.get_trials(deepcopy=False)
    summary = {
        "task": task.name,
        "metric": task.metric,
        "direction": task.direction,
        "n_trials": len(trials),
        "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "study": {"storage": settings.storage, "name": settings.study_name},
    }
    if summary["n_complete"]:
        best = study.best_trial
        summary.update(
            {
                "cv_mean": best.value,
                "cv_std": best.user_attrs.get("cv_std"),
                "fold_scores": best.user_attrs.get("fold_scores"),
                "best_trial": best.number,
                "best_params": best.params,
            }
        )
    return summary


def fit_estimators(
    study: optuna.Study, settings: SweepSettings, datamodule, tracker: Tracker, out_dir: Path, parent_run_id: str | None
) -> tuple[dict[str, FittedEstimator], dict[str, str]]:
    """The preset's estimators fitted on the trials' folds, their predictions kept beside the
    trials' (``predictions/estimator-<name>.npz``), each logged as a child run of the study's;
    and the message of each that failed."""
    task, fitted, failed = settings.task, {}, {}
    for name in task.preset.sweep.estimators:
        try:
            fitted[name] = estimator = cross_fit(task, name, datamodule)
        except EstimatorFailed as err:
            failed[name] = str(err)
            print(f"error: {err}; the ensemble was selected without it", file=sys.stderr)
            continue
        kept = estimator.predictions.save(out_dir / "predictions" / f"estimator-{name}.npz")
        if parent_run_id:
            run_id = estimator_run(study, settings, datamodule, tracker, estimator, parent_run_id)
            tracker.log_metrics(
                run_id,
                {
                    "cv_mean": estimator.cv,
                    "cv_std": float(np.std(estimator.fold_scores)),
                    "seconds": estimator.seconds,
                    **{f"fold{f}_{task.metric}": v for f, v in zip(datamodule.members.folds, estimator.fold_scores)},
                },
            )
            tracker.log_artifact(run_id, kept, "predictions")
            tracker.end_run(run_id)
    return fitted, failed


def estimator_run(
    study: optuna.Study,
    settings: SweepSettings,
    datamodule,
    tracker: Tracker,
    estimator: FittedEstimator,
    parent_run_id: str,
) -> str:
    """The estimator's child run of the study's, with its data and source as a trial's: the one an
    earlier export created for the same class and arguments, else a new one (a run's parameters
    cannot change)."""
    spec = json.dumps({"estimator": estimator.reference, "args": estimator.args}, sort_keys=True)
    runs = dict(study.user_attrs.get(ESTIMATOR_RUN_ATTR, {}))
    earlier = runs.get(estimator.name, {})
    if earlier.get("spec") == spec and tracker.has_run(earlier["run_id"]):
        return earlier["run_id"]
    run_id = tracker.start_run(
        f"estimator-{estimator.name}",
        parent_run_id,
        {"kind": "estimator", "study": settings.study_name, **source_tags(settings.entry_point)},
    )
    tracker.log_inputs(run_id, dataset_inputs(datamodule))
    tracker.log_params(
        run_id, {"estimator": estimator.reference, **{f"args.{k}": v for k, v in estimator.args.items()}}
    )
    # a run created while the server is away has a local id only this command resolves: the next
    # export creates another rather than write to an id it cannot resolve
    resolved = tracker.resolve(run_id)
    if not resolved.startswith(PENDING_PREFIX):
        runs[estimator.name] = {"run_id": resolved, "spec": spec}
        study.set_user_attr(ESTIMATOR_RUN_ATTR, runs)
    return run_id


def select_ensemble(
    library: dict[Member, Predictions], task, datamodule, best: optuna.trial.FrozenTrial
) -> tuple[dict[Member, float], dict]:
    """The members' weights in the ensemble selected on their out-of-fold predictions
    (project/ensemble/selection.py), and what to report of it: its members, its scores and the best trial's
    alone. ``library`` holds the trials' kept predictions by number, and estimators' by name;
    trials with no kept predictions (run before they were kept) are left out; with fewer than two
    candidates, the best trial alone."""
    if len(library) < 2 or best.number not in library:
        return {best.number: 1.0}, {
            "members": [member_entry(best.number, 1.0)],
            "note": f"{len(library)} trial(s) with kept predictions: the best trial alone",
        }
    targets = datamodule.targets[library[best.number].rows].numpy()
    weights = select(task, library, targets)
    weights = dict(sorted(weights.items(), key=lambda item: (item[0] != best.number, -item[1])))
    metric, folds, mix = task.metric, library[best.number].folds, blend(library, weights)
    return weights, {
        "members": [member_entry(n, w) for n, w in weights.items()],
        "library": sum(isinstance(n, int) for n in library),
        "estimators": [n for n in library if isinstance(n, str)],
        f"cv_{metric}": cv_score(task, mix, targets, folds),
        f"oof_{metric}": float(scores(task, mix[None], targets)[0]),
        f"best_trial_oof_{metric}": float(scores(task, library[best.number].oof[None], targets)[0]),
        f"held_out_cv_{metric}": held_out_score(task, library, targets, folds),
        "note": f"cv_{metric}: the mean of the folds' scores, as a trial's CV score; oof_{metric}: the score of "
        "all out-of-fold rows pooled. Selected on the same predictions it is scored on: optimistic. "
        f"held_out_cv_{metric}: each fold scored by the ensemble selected on the other folds' rows",
    }


def selected_refits(
    study: optuna.Study,
    settings: SweepSettings,
    summary: dict,
    library: dict[Member, Predictions],
    datamodule,
    best: optuna.trial.FrozenTrial,
) -> list[Refit]:
    """For a task that refits: the configurations the study's ensemble weights most, as many as the
    refit's budget of members (``final.seeds``), one seed each, their weights renormalised; none
    where the selection keeps the best trial alone (which is then refitted on that many seeds)."""
    task = settings.task
    weights, summary["ensemble"] = select_ensemble(library, task, datamodule, best)
    if len(weights) < 2 or task.seeds < 2:
        return []
    top = sorted(weights.items(), key=lambda item: -item[1])[: task.seeds]
    total = sum(w for _, w in top)
    summary["ensemble"]["refit"] = [{"trial": n, "weight": w / total} for n, w in top]
    return [
        Refit(config_from_params(task, settings.model, study.trials[n].params, settings.fixed), weight=w, trial=n)
        for n, w in top
        if isinstance(n, int)  # a refit's library holds trials alone
    ]


def export_best(
    study: optuna.Study, settings: SweepSettings, tracker: Tracker, out_dir: Path, parent_run_id: str | None
) -> dict:
    """Write everything from the study: the ensemble selected from the trials' kept predictions
    and, where the submission is made of fold models, the selected trials' kept fold models,
    loaded, not trained again (``project/sweep/kept.py`` recovers a file that cannot be read). A
    task that refits (images) refits the selected configurations on every training row; its best
    trial's curves, for their plot, are read back from its MLflow run."""
    task = settings.task
    best = best_trial(study)
    best_run = best.user_attrs.get(RUN_ID_ATTR)
    config = config_from_params(task, settings.model, best.params, settings.fixed)
    datamodule = settings.datamodule(task)
    complete = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
    kept = KeptTrials(
        task,
        datamodule,
        tracker,
        out_dir,
        settings.seed,
        settings.stacking,
        lambda trial: config_from_params(task, settings.model, trial.params, settings.fixed),
    )

    summary = {**study_summary(study, settings), "config": config.to_dict()}
    submission = out_dir / task.preset.submission.file
    if task.refits:
        curves = tracker.read_cv(best_run, datamodule.folds, task.metric) if best_run else None
        curves = curves or kept.result(best)
        refits = [Refit(config, seeds=task.seeds, trial=best.number)]
        if settings.ensemble != "none":
            refits = (
                selected_refits(study, settings, summary, kept.predictions(list(complete.values())), datamodule, best)
                or refits
            )
        predictor, scores = refit_and_test(task, refits, settings.data_dir, settings.seed, submission)
        summary.update(scores)
    else:
        weights: dict[Member, float] = {best.number: 1.0}
        estimators: dict[str, FittedEstimator] = {}
        if settings.ensemble != "none":
            library = kept.predictions(list(complete.values()))
            failed: dict[str, str] = {}
            if settings.ensemble == "greedy":
                estimators, failed = fit_estimators(study, settings, datamodule, tracker, out_dir, parent_run_id)
            library.update({name: e.predictions for name, e in estimators.items()})
            weights, summary["ensemble"] = select_ensemble(library, task, datamodule, best)
            summary["estimators"] = {
                name: {
                    "estimator": e.reference,
                    f"cv_{task.metric}": e.cv,
                    "fold_scores": e.fold_scores,
                    "seconds": e.seconds,
                }
                for name, e in estimators.items()
            }
            if failed:
                summary["estimator_errors"] = failed
        predictors: list[Predicts] = []
        for number in weights:  # each member's fold models, as its trial kept them
            if isinstance(number, str):
                predictors.append(EstimatorPredictor.from_fitted(task, estimators[number], datamodule))
            else:
                predictors.append(kept.predictor(complete[number])[0])
        curves = kept.predictor(best)[1]
        predictor = (
            predictors[0] if len(predictors) == 1 else Ensemble(list(weights.values()), predictors, list(weights))
        )
    if kept.left_out:
        summary.setdefault("ensemble", {})["left_out"] = {str(n): why for n, why in kept.left_out.items()}
    summary["cv_mean_rerun"] = kept.retrained[best.number].mean if best.number in kept.retrained else None
    plots_dir = out_dir / "plots"
    plots = [
        *study_plots(study, plots_dir),
        learning_curves(curves, datamodule.folds, plots_dir / "best_learning_curves.png"),
    ]
    ensemble = summary.get("ensemble", {})
    used = ensemble.get("refit", ensemble.get("members", []))  # a refitting task refits the heaviest
    if parent_run_id:
        if best_run and tracker.has_run(best_run):  # a worker may have logged to another MLflow store
            tracker.set_tags(best_run, {"best_trial": "true"})
        tracker.set_tags(parent_run_id, {"best_trial_number": str(best.number), "best_trial_run_id": best_run or ""})
        metrics = {"best_cv_mean": best.value, "n_complete": summary["n_complete"]}
        if f"oof_{task.metric}" in ensemble:
            metrics.update(
                {
                    f"ensemble_cv_{task.metric}": ensemble[f"cv_{task.metric}"],
                    f"ensemble_oof_{task.metric}": ensemble[f"oof_{task.metric}"],
                    f"best_trial_oof_{task.metric}": ensemble[f"best_trial_oof_{task.metric}"],
                }
            )
            if ensemble[f"held_out_cv_{task.metric}"] is not None:
                metrics[f"ensemble_held_out_cv_{task.metric}"] = ensemble[f"held_out_cv_{task.metric}"]
        if ensemble:
            tracker.set_tags(parent_run_id, {"ensemble": json.dumps(used)})
        if task.refits:
            metrics.update(refit_metrics(scores))
        tracker.log_metrics(parent_run_id, metrics)
    tags = {"study": settings.study_name, "trial": best.number, f"cv_{task.metric}": best.value}
    if len(used) > 1:
        tags["ensemble"] = json.dumps(used)
    return deliver(
        predictor,
        datamodule,
        out_dir,
        summary,
        tracker,
        parent_run_id,
        submission_written=task.refits,
        registered_name=task.name,
        tags=tags,
        plots=plots,
    )
