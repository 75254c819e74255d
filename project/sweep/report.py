"""What a sweep prints once it is done: the trials, the best one, the estimators, the ensemble, the
refit's test scores and where everything is."""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

from project.tracking.tracker import Tracker


def print_report(
    summary: dict,
    study: optuna.Study,
    n_trials: int,
    elapsed: float,
    export_seconds: float,
    out: Path,
    tracker: Tracker,
    lost: list,
) -> None:
    metric = summary["metric"]
    states = {
        s.name: sum(t.state == s for t in study.trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }
    print(f"\n{n_trials} trial(s) in {elapsed:.0f}s, the export in {export_seconds:.0f}s; study totals: {states}")
    print(f"best trial {summary['best_trial']}: cv_{metric} {summary['cv_mean']:.5f} ± {summary['cv_std']:.5f}")
    print("best params: " + ", ".join(f"{k}={v}" for k, v in summary["best_params"].items()))
    for name, estimator in summary.get("estimators", {}).items():
        print(
            f"estimator {name} ({estimator['estimator']}): cv_{metric} {estimator[f'cv_{metric}']:.5f}, "
            f"fitted in {estimator['seconds']:.0f}s"
        )
    ensemble = summary.get("ensemble", {})
    if f"oof_{metric}" in ensemble:
        members = ", ".join(f"{member_label(m)} × {m['weight']:.2f}" for m in ensemble["members"])
        beside = f" and {len(ensemble['estimators'])} estimator(s)" if ensemble.get("estimators") else ""
        print(
            f"ensemble of {len(ensemble['members'])} chosen from {ensemble['library']} trial(s){beside}: {members}; "
            f"cv_{metric} {ensemble[f'cv_{metric}']:.5f} (the best trial's {summary['cv_mean']:.5f}); "
            f"pooled out-of-fold {ensemble[f'oof_{metric}']:.5f} (the best trial's "
            f"{ensemble[f'best_trial_oof_{metric}']:.5f}); chosen on these folds, so optimistic"
        )
        if ensemble[f"held_out_cv_{metric}"] is not None:
            print(
                f"each fold scored by the ensemble selected on the other folds: cv_{metric} "
                f"{ensemble[f'held_out_cv_{metric}']:.5f}"
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


def member_label(member: dict) -> str:
    return f"trial {member['trial']}" if "trial" in member else member["estimator"]
