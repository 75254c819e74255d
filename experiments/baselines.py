"""Classic models on exactly the sweep's House Prices folds and features, for comparison.

    python experiments/baselines.py

Ridge (alpha 30), Lasso (alpha 5e-4) and gradient boosting (Huber loss, 1500 trees of depth 4),
from scikit-learn, are fitted on each fold's training part, with the
same per-fold preprocessing and outlier handling as the sweep, and scored on the same whole
validation folds. Besides the CV mean of fold RMSEs it prints the pooled RMSE without the two
partial sales (Id 1299 and 524) and the error on each of them: how much of a score is those two rows.
Each model is one MLflow run in the experiment ``house-prices-baselines``.

    python experiments/baselines.py --study-dir experiments/outputs/house-prices

also selects an ensemble (``project/ensemble.py``) from that sweep's trials' out-of-fold
predictions, and again with these models added to the trials: what models of another kind would
bring to the study's ensemble. Both scores are chosen on the folds they are reported on, so both
are optimistic.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Lasso, Ridge

from project.cli import folds_int
from project.data import DataError
from project.ensemble import Predictions, blend, cv_score, select
from project.paths import REPO_ROOT
from project.tasks import get_task
from project.tuning.tracking import Tracker, environment_tags

PARTIAL_SALES = (1299, 524)
MODELS = {
    "ridge": lambda: Ridge(alpha=30.0),
    "lasso": lambda: Lasso(alpha=5e-4, max_iter=20_000),
    "boosting": lambda: GradientBoostingRegressor(
        n_estimators=1500, learning_rate=0.05, max_depth=4, max_features="sqrt", min_samples_leaf=15,
        min_samples_split=10, loss="huber", random_state=5),
}


def cross_validate_model(make, datamodule) -> tuple[list[float], np.ndarray]:
    """Fit a fresh model on each member's training part; return fold RMSEs and every row's error."""
    members = datamodule.members
    x, y = members.features.x.numpy(), datamodule.targets.numpy()
    errors, scores = np.zeros_like(y), []
    for m, (train, val) in enumerate(zip(members.train_rows, members.val_rows)):
        train, val = train.numpy(), val.numpy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lasso's convergence notes
            model = make().fit(x[m, train], y[train])
        errors[val] = model.predict(x[m, val]) - y[val]
        scores.append(float(np.sqrt(np.mean(errors[val] ** 2))))
    return scores, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    parser.add_argument("--folds", type=folds_int, default=5, help="CV folds (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--study-dir", type=Path, default=None,
                        help="a House Prices sweep's output folder: also select an ensemble from its trials' "
                             "out-of-fold predictions (predictions/trial-<n>.npz), with and without these models")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo)")
    args = parser.parse_args(argv)
    chosen = args.models.split(",")
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        parser.error(f"argument --models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    task = get_task("house-prices")
    dm = task.datamodule(data_dir=args.data_dir, n_folds=args.folds, fold=list(range(args.folds)))
    try:
        dm.prepare_data()
        dm.setup()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    targets, folds = dm.targets.numpy().astype(np.float64), validation_folds(dm)
    if args.study_dir is not None:
        try:
            library = study_library(args.study_dir, folds, dm.seed)
        except ValueError as err:
            parser.error(f"argument --study-dir: {err}")
    tracker = Tracker(args.tracking_uri, "house-prices-baselines")
    oof = {}
    ids = dm.train_frame[dm.spec.id_column].to_numpy()
    present = [i for i in PARTIAL_SALES if (ids == i).any()]
    print(f"{'model':<12}{'CV RMSE':>9}{'std':>8}{'pooled w/o 2':>14}" + "".join(f"{f'err {i}':>10}" for i in present)
          + f"{'seconds':>9}")
    for name in chosen:
        start = time.perf_counter()
        scores, errors = cross_validate_model(MODELS[name], dm)
        oof[name] = errors + targets
        pooled = float(np.sqrt(np.mean(errors[~np.isin(ids, PARTIAL_SALES)] ** 2)))
        special = {i: float(errors[ids == i][0]) for i in present}
        run_id = tracker.start_run(name, tags={**environment_tags(), "kind": "baseline"})
        tracker.log_params(run_id, {"model": repr(MODELS[name]()), "folds": args.folds})
        tracker.log_metrics(run_id, {"cv_mean": float(np.mean(scores)), "cv_std": float(np.std(scores)),
                                     "rmse_without_partial_sales": pooled,
                                     **{f"fold{k}_rmse": v for k, v in enumerate(scores)},
                                     **{f"error_id{i}": e for i, e in special.items()}})
        tracker.end_run(run_id)
        print(f"{name:<12}{np.mean(scores):>9.4f}{np.std(scores):>8.4f}{pooled:>14.4f}"
              + "".join(f"{e:>10.2f}" for e in special.values()) + f"{time.perf_counter() - start:>9.1f}", flush=True)
    if args.study_dir is not None:
        print_ensembles(task, library, oof, targets, folds)
    return 0


def validation_folds(datamodule) -> np.ndarray:
    """Each training row's validation fold, as a trial's kept predictions record it."""
    members = datamodule.members
    folds = np.zeros(len(datamodule.targets), dtype=np.int64)
    for fold, rows in zip(members.folds, members.val_rows):
        folds[rows.numpy()] = fold
    return folds


def study_library(study_dir: Path, folds: np.ndarray, seed: int) -> dict[int, Predictions]:
    """The sweep's kept out-of-fold predictions by trial number, checked to be of these folds."""
    files = sorted((study_dir / "predictions").glob("trial-*.npz"))
    if not files:
        raise ValueError(f"{study_dir / 'predictions'} holds no trial-<n>.npz: expected a sweep's output folder")
    library = {}
    for path in files:
        kept = Predictions.load(path)
        if not (np.array_equal(kept.rows, np.arange(len(folds))) and np.array_equal(kept.folds, folds)):
            raise ValueError(f"{path}: its out-of-fold predictions are of other folds than these "
                             f"({len(folds)} rows in --folds {folds.max() + 1}, seed {seed})")
        library[int(path.stem.removeprefix("trial-"))] = kept
    return library


def print_ensembles(task, library: dict[int, Predictions], oof: dict[str, np.ndarray], targets: np.ndarray,
                    folds: np.ndarray) -> None:
    """The study's ensemble, and the ensemble of the study's trials and these models together."""
    names = {n: f"trial {n}" for n in library}
    both = dict(library)
    for k, (name, predictions) in enumerate(oof.items()):
        both[-1 - k], names[-1 - k] = Predictions(np.arange(len(targets)), folds, predictions), name
    for label, candidates in ((f"the study's {len(library)} trials", library),
                              (f"the study's trials and {', '.join(oof)}", both)):
        weights = select(task, candidates, targets)
        members = ", ".join(f"{names[n]} × {w:.2f}" for n, w in sorted(weights.items(), key=lambda nw: -nw[1]))
        score = cv_score(task, blend(candidates, weights), targets, folds)
        print(f"ensemble of {label}: CV RMSE {score:.4f} ({members})")


if __name__ == "__main__":
    sys.exit(main())
