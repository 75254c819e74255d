"""The House Prices preset's estimators alone, on exactly the sweep's folds and features.

    python experiments/tools/baselines.py                      # every estimator of sweep.estimators
    python experiments/tools/baselines.py --models lasso

The sweep fits the estimators its preset lists under ``sweep.estimators`` (a Lasso and gradient
boosting, from scikit-learn) on each fold's training part, with the same per-fold preprocessing
and outlier handling as its trials, and weighs them in the study's ensemble (``project/ensemble/estimators.py``).
This prints what each scores alone: besides the CV mean of fold RMSEs, the pooled RMSE without the
two partial sales (Id 1299 and 524) and the error on each of them: how much of a score is those two
rows. Each model is one MLflow run in the experiment ``house-prices-baselines``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from project.cli import folds_int
from project.data import DataError
from project.ensemble.estimators import EstimatorFailed, cross_fit
from project.tasks import get_task
from project.tracking.tracker import Tracker, environment_tags
from project.utils.paths import REPO_ROOT

PARTIAL_SALES = (1299, 524)


def main(argv: list[str] | None = None) -> int:
    task = get_task("house-prices")
    estimators = task.preset.sweep.estimators
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    parser.add_argument("--folds", type=folds_int, default=5, help="CV folds (default: %(default)s)")
    parser.add_argument("--models", default=",".join(estimators), help="comma-separated (default: %(default)s)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo)",
    )
    args = parser.parse_args(argv)
    chosen = args.models.split(",")
    unknown = [m for m in chosen if m not in estimators]
    if unknown:
        parser.error(
            f"argument --models: unknown {unknown}; expected some of {', '.join(estimators)} "
            f"(sweep.estimators in {task.preset.source})"
        )
    try:
        dm = task.prepared(args.data_dir, n_folds=args.folds, fold=list(range(args.folds)))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    targets = dm.targets.numpy().astype(np.float64)
    tracker = Tracker(args.tracking_uri, "house-prices-baselines")
    ids = dm.train_frame[dm.spec.id_column].to_numpy()
    present = [i for i in PARTIAL_SALES if (ids == i).any()]
    print(
        f"{'model':<12}{'CV RMSE':>9}{'std':>8}{'pooled w/o 2':>14}"
        + "".join(f"{f'err {i}':>10}" for i in present)
        + f"{'seconds':>9}"
    )
    for name in chosen:
        try:
            fitted = cross_fit(task, name, dm)
        except EstimatorFailed as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        errors = fitted.predictions.oof - targets[fitted.predictions.rows]
        pooled = float(np.sqrt(np.mean(errors[~np.isin(ids, PARTIAL_SALES)] ** 2)))
        special = {i: float(errors[ids == i][0]) for i in present}
        run_id = tracker.start_run(name, tags={**environment_tags(), "kind": "baseline"})
        tracker.log_params(
            run_id,
            {"estimator": fitted.reference, **{f"args.{k}": v for k, v in fitted.args.items()}, "folds": args.folds},
        )
        tracker.log_metrics(
            run_id,
            {
                "cv_mean": fitted.cv,
                "cv_std": float(np.std(fitted.fold_scores)),
                "rmse_without_partial_sales": pooled,
                **{f"fold{k}_rmse": v for k, v in enumerate(fitted.fold_scores)},
                **{f"error_id{i}": e for i, e in special.items()},
            },
        )
        tracker.end_run(run_id)
        print(
            f"{name:<12}{fitted.cv:>9.4f}{np.std(fitted.fold_scores):>8.4f}{pooled:>14.4f}"
            + "".join(f"{e:>10.2f}" for e in special.values())
            + f"{fitted.seconds:>9.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
