"""Small generated data sets in the real file formats, and paths to the real ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from project.data.idx import write_idx

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO / "data"


def make_house_frames(n_train: int = 60, n_test: int = 20, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A miniature House Prices: a few numeric and categorical columns, missing values included."""
    rng = np.random.default_rng(seed)

    def frame(n: int, first_id: int) -> pd.DataFrame:
        area = rng.integers(500, 4000, n).astype(float)
        quality = rng.integers(1, 11, n)
        df = pd.DataFrame(
            {
                "Id": np.arange(first_id, first_id + n),
                "MSSubClass": rng.choice([20, 60, 120], n),
                "LotFrontage": np.where(rng.random(n) < 0.2, np.nan, rng.integers(20, 120, n)),
                "OverallQual": quality,
                "YearBuilt": rng.integers(1900, 2010, n),
                "YearRemodAdd": rng.integers(1950, 2010, n),
                "YrSold": rng.integers(2006, 2011, n),
                "GrLivArea": area,
                "TotalBsmtSF": rng.integers(0, 2000, n).astype(float),
                "Neighborhood": rng.choice(["NAmes", "CollgCr", "OldTown", "Edwards"], n),
                "KitchenQual": rng.choice(["Ex", "Gd", "TA", "Fa", None], n),
            }
        )
        df["SalePrice"] = np.round(20000 + 60 * area + 9000 * quality + rng.normal(0, 5000, n)).clip(10000)
        return df

    train = frame(n_train, 1)
    test = frame(n_test, n_train + 1).drop(columns="SalePrice")
    return train, test


@pytest.fixture
def house_dir(tmp_path: Path) -> Path:
    """A data dir holding house-prices/train.csv and test.csv, generated."""
    train, test = make_house_frames()
    folder = tmp_path / "house-prices"
    folder.mkdir()
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return tmp_path


def write_idx_set(folder: Path, n_train: int = 200, n_test: int = 50, seed: int = 0) -> None:
    """Four MNIST-format IDX files of random 28x28 images whose class sets the brightness of a patch."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[:, 10:18, 10:18] = (labels * 25)[:, None, None].astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    write_idx_set(tmp_path / "fashion-mnist")
    return tmp_path


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "house-prices" / "train.csv").is_file():
        pytest.skip("real data not fetched: run `make data`")
    return REAL_DATA


def house_task_dm(data_dir: Path, folds: int = 3, **kwargs):
    """The House Prices task and a set-up DataModule stacking all ``folds`` folds of ``data_dir``."""
    from project.tasks import get_task

    task = get_task("house-prices")
    dm = task.datamodule(data_dir=data_dir, n_folds=folds, fold=list(range(folds)), **kwargs)
    dm.setup()
    return task, dm


def write_sklearn_csvs(folder: Path, name: str, seed: int = 0) -> pd.Series:
    """A real data set that ships inside scikit-learn as train.csv and test.csv, with an ``id``
    column; returns the held-out test targets. ``iris``: string labels (``species``); ``concavity``:
    breast cancer's "worst concavity" from 20 other measurements, a regression target that is zero
    in 13 rows."""
    from sklearn.datasets import load_breast_cancer, load_iris
    from sklearn.model_selection import train_test_split

    if name == "iris":
        data = load_iris(as_frame=True)
        frame = data.frame.rename(columns=lambda c: c.replace(" (cm)", "").replace(" ", "_"))
        frame["species"] = data.target_names[frame.pop("target")]
        target = "species"
    else:
        frame = load_breast_cancer(as_frame=True).frame.drop(columns="target")
        frame = frame[[c for c in frame.columns if "concav" not in c] + ["worst concavity"]]
        frame.columns = [c.replace(" ", "_") for c in frame.columns]
        target = "worst_concavity"
    frame.insert(0, "id", np.arange(1000, 1000 + len(frame)))
    stratify = frame[target] if name == "iris" else None
    train, test = train_test_split(frame, test_size=0.25, random_state=seed, stratify=stratify)
    folder.mkdir(parents=True, exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test.drop(columns=target).to_csv(folder / "test.csv", index=False)
    return test.set_index("id")[target]
