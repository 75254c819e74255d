"""Classic models on exactly the sweep's House Prices folds and features, for comparison.

    python experiments/baselines.py

Ridge (alpha 30), Lasso (alpha 5e-4) and gradient boosting (Huber loss, 1500 trees of depth 4),
from scikit-learn, are fitted on each fold's training part, with the
same per-fold preprocessing and outlier handling as the sweep, and scored on the same whole
validation folds. Besides the CV mean of fold RMSEs it prints the pooled RMSE without the two
partial sales (Id 1299 and 524) and the error on each of them: how much of a score is those two rows.
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

from project.cli import REPO_ROOT
from project.tasks import get_task

PARTIAL_SALES = (1299, 524)
MODELS = {
    "ridge": lambda: Ridge(alpha=30.0),
    "lasso": lambda: Lasso(alpha=5e-4, max_iter=20_000),
    "boosting": lambda: GradientBoostingRegressor(
        n_estimators=1500, learning_rate=0.05, max_depth=4, max_features="sqrt", min_samples_leaf=15,
        min_samples_split=10, loss="huber", random_state=5),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    parser.add_argument("--folds", type=int, default=5, help="CV folds (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    args = parser.parse_args(argv)
    chosen = args.models.split(",")
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        parser.error(f"argument --models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    task = get_task("house-prices")
    dm = task.datamodule(data_dir=args.data_dir, n_folds=args.folds, fold=list(range(args.folds)),
                         **task.datamodule_kwargs)
    dm.prepare_data()
    dm.setup()
    x, y = dm.features.x.numpy(), dm.targets.numpy()
    ids = dm.train_frame[dm.spec.id_column].to_numpy()
    special = np.isin(ids, PARTIAL_SALES)
    print(f"{'model':<28}{'CV RMSE':>9}{'std':>8}{'pooled w/o 2':>14}"
          + "".join(f"{f'err {i}':>10}" for i in PARTIAL_SALES) + f"{'seconds':>9}")
    for name in chosen:
        make = MODELS[name]
        start = time.perf_counter()
        errors, scores = np.zeros_like(y), []
        for m, (train, val) in enumerate(zip(dm.train_rows, dm.val_rows)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Lasso's convergence notes
                model = make().fit(x[m, train.numpy()], y[train.numpy()])
            errors[val.numpy()] = model.predict(x[m, val.numpy()]) - y[val.numpy()]
            scores.append(float(np.sqrt(np.mean(errors[val.numpy()] ** 2))))
        pooled = float(np.sqrt(np.mean(errors[~special] ** 2)))
        row = f"{name:<28}{np.mean(scores):>9.4f}{np.std(scores):>8.4f}{pooled:>14.4f}"
        row += "".join(f"{errors[ids == i][0]:>10.2f}" if (ids == i).any() else f"{'-':>10}" for i in PARTIAL_SALES)
        print(row + f"{time.perf_counter() - start:>9.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
