"""From a finished study to the deliverables: the best configuration re-run, the submission or the
test accuracy, the model, plots and summary.json, all logged on the study's MLflow run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from project.cv import cross_validate
from project.ensemble import Predictions, blend, cv_score, scores, select
from project.predictor import Ensemble, Predictor
from project.refit import Refit, refit_and_test, refit_metrics
from project.serving import log_predictor
from project.tuning.plots import learning_curves, study_plots
from project.tuning.space import config_from_params
from project.tuning.recovery import RUN_ID_ATTR
from project.tuning.study import PREDICTIONS_ATTR, SweepSettings
from project.tuning.tracking import Tracker


ENSEMBLES = ("greedy", "none")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study {study.study_name!r} has no complete trial yet; run the sweep first")
    return study.best_trial


def study_summary(study: optuna.Study, settings: SweepSettings) -> dict:
    """What the study holds: its trial counts and, once a trial completed, the best one."""
    task, trials = settings.task, study.get_trials(deepcopy=False)
    summary = {
        "task": task.name, "metric": task.metric, "direction": task.direction,
        "n_trials": len(trials), "n_complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "n_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "n_failed": sum(t.state == TrialState.FAIL for t in trials),
        "study": {"storage": settings.storage, "name": settings.study_name},
    }
    if summary["n_complete"]:
        best = study.best_trial
        summary.update({"cv_mean": best.value, "cv_std": best.user_attrs.get("cv_std"),
                        "fold_scores": best.user_attrs.get("fold_scores"), "best_trial": best.number,
                        "best_params": best.params})
    return summary


def kept_predictions(study: optuna.Study, tracker: Tracker, out_dir: Path) -> dict[int, Predictions]:
    """The completed trials' kept predictions: the file a worker of this machine wrote, else the
    copy its MLflow run holds (a worker on another machine), fetched into ``out_dir``."""
    library = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        path = Path(trial.user_attrs.get(PREDICTIONS_ATTR, ""))
        if not path.is_file() and RUN_ID_ATTR in trial.user_attrs and trial.user_attrs.get(PREDICTIONS_ATTR):
            path = tracker.download_artifact(trial.user_attrs[RUN_ID_ATTR], f"predictions/{path.name}",
                                             out_dir / "predictions" / "downloaded") or path
        if path.is_file():
            library[trial.number] = Predictions.load(path)
    return library


def select_ensemble(library: dict[int, Predictions], task, datamodule,
                    best: optuna.trial.FrozenTrial) -> tuple[dict[int, float], dict]:
    """The trials' weights in the ensemble selected on their out-of-fold predictions
    (project/ensemble.py), and what to report of it: its members, its scores and the best trial's
    alone. Trials with no kept predictions (run before they were kept) are left out; with fewer
    than two, the best trial alone."""
    if len(library) < 2 or best.number not in library:
        return {best.number: 1.0}, {"members": [{"trial": best.number, "weight": 1.0}],
                                    "note": f"{len(library)} trial(s) with kept predictions: the best trial alone"}
    targets = datamodule.targets[library[best.number].rows].numpy()
    weights = select(task, library, targets)
    weights = dict(sorted(weights.items(), key=lambda item: (item[0] != best.number, -item[1])))
    metric, folds, mix = task.metric, library[best.number].folds, blend(library, weights)
    return weights, {
        "members": [{"trial": n, "weight": w} for n, w in weights.items()], "library": len(library),
        f"cv_{metric}": cv_score(task, mix, targets, folds),
        f"oof_{metric}": float(scores(task, mix[None], targets)[0]),
        f"best_trial_oof_{metric}": float(scores(task, library[best.number].oof[None], targets)[0]),
        "note": f"cv_{metric}: the mean of the folds' scores, as a trial's CV score; oof_{metric}: the score of "
                "all out-of-fold rows pooled. Selected on the same predictions it is scored on: optimistic",
    }


def selected_refits(study: optuna.Study, settings: SweepSettings, summary: dict, library: dict[int, Predictions],
                    datamodule, best: optuna.trial.FrozenTrial) -> list[Refit]:
    """For a task that refits: the configurations the study's ensemble weights most, as many as the
    refit's budget of members (``final.ensemble``), one seed each, their weights renormalised; none
    where the selection keeps the best trial alone (which is then refitted on that many seeds)."""
    task = settings.task
    weights, summary["ensemble"] = select_ensemble(library, task, datamodule, best)
    if len(weights) < 2 or task.ensemble < 2:
        return []
    top = sorted(weights.items(), key=lambda item: -item[1])[: task.ensemble]
    total = sum(w for _, w in top)
    summary["ensemble"]["refit"] = [{"trial": n, "weight": w / total} for n, w in top]
    return [Refit(config_from_params(task, settings.model, study.trials[n].params, settings.fixed), weight=w, trial=n)
            for n, w in top]


def export_best(study: optuna.Study, settings: SweepSettings, tracker: Tracker, out_dir: Path,
                parent_run_id: str | None) -> dict:
    """Rebuild the best trial's fold models (deterministic: the same models) where the submission
    is made of them, then write everything. A task that refits (images) needs only the trial's
    curves for their plot, which its MLflow run holds, so they are read back, not trained again."""
    task = settings.task
    best = best_trial(study)
    best_run = best.user_attrs.get(RUN_ID_ATTR)
    config = config_from_params(task, settings.model, best.params, settings.fixed)
    datamodule = settings.datamodule(task)
    result = None
    if task.refits and best_run:
        result = tracker.read_cv(best_run, datamodule.folds, task.metric)
    rerun = result is None
    if rerun:
        result = cross_validate(task, config, seed=settings.seed, stacking=settings.stacking, datamodule=datamodule)

    summary = {**study_summary(study, settings), "cv_mean_rerun": result.mean if rerun else None,
               "config": config.to_dict()}
    plots_dir = out_dir / "plots"
    plots = study_plots(study, plots_dir) + [learning_curves(result, datamodule.folds, plots_dir / "best_learning_curves.png")]
    submission = out_dir / task.preset.submission.file
    test_inputs = datamodule.test_inputs()  # read once: the file for a table task
    if task.refits:
        refits = [Refit(config, seeds=task.ensemble, trial=best.number)]
        if settings.ensemble == "greedy":
            refits = selected_refits(study, settings, summary, kept_predictions(study, tracker, out_dir), datamodule,
                                     best) or refits
        predictor, scores = refit_and_test(task, refits, settings.data_dir, settings.seed, submission)
        summary.update(scores)
    else:
        weights = {best.number: 1.0}
        if settings.ensemble == "greedy":
            library = kept_predictions(study, tracker, out_dir)
            weights, summary["ensemble"] = select_ensemble(library, task, datamodule, best)
        predictors = []
        for number in weights:  # each member's fold models, trained again (deterministic: the same models)
            if number == best.number:
                member_config, fits = config, result.fits
            else:
                member_config = config_from_params(task, settings.model, study.trials[number].params, settings.fixed)
                fits = cross_validate(task, member_config, seed=settings.seed, stacking=settings.stacking,
                                      datamodule=datamodule).fits
            predictors.append(Predictor.from_fits(task, member_config, fits, datamodule))
        predictor = predictors[0] if len(predictors) == 1 else Ensemble(list(weights.values()), predictors, list(weights))
        predictor.write_submission(test_inputs, submission, datamodule.test_ids)
    summary["submission"] = str(submission)
    summary["model"] = str(predictor.save(out_dir / "model"))
    summary["mlflow"] = {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                         "run_id": parent_run_id}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    if parent_run_id:
        if best_run and tracker.has_run(best_run):  # a worker may have logged to another MLflow store
            tracker.set_tags(best_run, {"best_trial": "true"})
        tracker.set_tags(parent_run_id, {"best_trial_number": best.number, "best_trial_run_id": best_run or ""})
        metrics = {"best_cv_mean": best.value, "n_complete": summary["n_complete"]}
        ensemble = summary.get("ensemble", {})
        if f"oof_{task.metric}" in ensemble:
            metrics.update({f"ensemble_cv_{task.metric}": ensemble[f"cv_{task.metric}"],
                            f"ensemble_oof_{task.metric}": ensemble[f"oof_{task.metric}"],
                            f"best_trial_oof_{task.metric}": ensemble[f"best_trial_oof_{task.metric}"]})
        used = ensemble.get("refit", ensemble.get("members", []))  # a refitting task refits the heaviest
        if ensemble:
            tracker.set_tags(parent_run_id, {"ensemble": json.dumps(used)})
        if task.refits:
            metrics.update(refit_metrics(scores))
        tracker.log_metrics(parent_run_id, metrics)
        for plot in plots:
            tracker.log_artifact(parent_run_id, plot, "plots")
        for path in (out_dir / "summary.json", submission):
            tracker.log_artifact(parent_run_id, path)
        tags = {"study": settings.study_name, "trial": best.number, f"cv_{task.metric}": best.value}
        if len(used) > 1:
            tags["ensemble"] = json.dumps(used)
        version = tracker.attempt(lambda: log_predictor(predictor, tracker.tracking_uri, tracker.resolve(parent_run_id),
                                                        test_inputs, registered_name=task.name, tags=tags))
        if version is None:
            print(f"the MLflow Model is not registered, tracking being unreachable: it is saved in {summary['model']}, "
                  "and experiments/export_submission.py registers it once the server is back", file=sys.stderr)
        else:
            summary["registered_model"] = f"models:/{version.name}/{version.version}"
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
