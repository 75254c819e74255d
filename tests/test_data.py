"""Sources, checks, DataModules and per-fold preprocessing."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pandas as pd
import pytest
import torch

from project.config import Augment, PresetError, preset_path
from project.data import DataError, PreprocessOptions, TableDataModule, sources
from project.data.augment import random_translate
from project.data.batches import MemberFeatures, StackedBatches
from project.data.idx import mnist_pickle_to_idx, read_idx
from project.data.tabular import FoldPreprocessor, QuantileClipper
from project.tasks import get_task
from project.validate import load_preset

from .conftest import make_house_frames


def write_house(tmp_path, train: pd.DataFrame, test: pd.DataFrame):
    folder = tmp_path / "house-prices"
    folder.mkdir(exist_ok=True)
    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    return tmp_path


def setup_house(data_dir, **kwargs) -> TableDataModule:
    dm = get_task("house-prices").datamodule(data_dir, **kwargs)
    dm.setup()
    return dm


# ---- House Prices -------------------------------------------------------------------------


def test_fold_sizes_and_features(house_dir):
    dm = setup_house(house_dir, n_folds=5, fold=0)
    assert (len(dm.members.train_rows[0]), len(dm.members.val_rows[0]), dm.test_size) == (48, 12, 20)
    batch = next(iter(dm.train_loader(64)))  # a chunk of mini-batches: [steps, members, rows, features]
    assert batch["x"].shape == (1, 1, 64, dm.n_features) and batch["w"].sum() == 48
    x, y = next(iter(dm.train_dataloader()))  # what a Trainer given the DataModule sees: one mini-batch
    assert x.shape == (48, dm.n_features) and y.shape == (48,)
    assert torch.isfinite(dm.members.features.x).all() and torch.isfinite(dm.members.test_features.x).all()
    # target is log(SalePrice)
    assert torch.allclose(
        dm.targets.double().exp(),
        torch.tensor(pd.read_csv(house_dir / "house-prices/train.csv")["SalePrice"].to_numpy()),
        rtol=1e-5,
    )


def test_folds_partition_the_rows_and_do_not_depend_on_configuration(house_dir):
    a = setup_house(house_dir, fold=list(range(5)), batch_size=8)
    b = setup_house(house_dir, fold=list(range(5)), batch_size=32)
    val = torch.cat(a.members.val_rows).sort().values
    assert torch.equal(val, torch.arange(60))
    for tr, va, tr_b in zip(a.members.train_rows, a.members.val_rows, b.members.train_rows):
        assert set(tr.tolist()).isdisjoint(va.tolist()) and torch.equal(tr, tr_b)


def test_full_fit_has_no_validation(house_dir):
    dm = setup_house(house_dir, fold=None)
    assert len(dm.members.train_rows[0]) == 60 and dm.val_dataloader() == []


def test_refit_replicas_share_rows_but_not_seeds(house_dir):
    dm = setup_house(house_dir, fold=None, replicas=3, n_folds=5)
    assert len(dm.members) == 3 and not dm.validates and dm.val_dataloader() == []
    assert all(torch.equal(rows, dm.members.train_rows[0]) for rows in dm.members.train_rows)
    assert dm.members.seed_ids == [5, 6, 7]  # replica 0 seeds as the single refit always did
    with pytest.raises(ValueError, match="replicas=2 is invalid"):
        get_task("house-prices").datamodule(house_dir, fold=0, replicas=2)


def test_preprocessing_is_fitted_on_training_rows_only(house_dir):
    """Changing the validation rows of a fold leaves the transform of every training row unchanged."""
    train, _ = make_house_frames()
    dm = setup_house(house_dir, fold=0)
    val = dm.members.val_rows[0].numpy()
    changed = train.copy()
    changed.loc[val, "GrLivArea"] = 1e6
    changed.loc[val, "LotFrontage"] = np.nan
    changed.loc[val, "Neighborhood"] = "NeverSeenInTraining"
    tr = dm.members.train_rows[0].numpy()
    for options in (
        PreprocessOptions(),
        get_task("house-prices").preset.data.preprocess,
        PreprocessOptions(scaler="quantile"),
    ):
        before = FoldPreprocessor(dm.spec, options).fit(train.iloc[tr])
        after = FoldPreprocessor(dm.spec, options).fit(changed.iloc[tr])
        np.testing.assert_array_equal(before.transform(train.iloc[tr]), after.transform(changed.iloc[tr]))
    # and the DataModule built on the changed file gives the same training features
    write_house(house_dir, changed, pd.read_csv(house_dir / "house-prices/test.csv"))
    dm2 = setup_house(house_dir, fold=0)
    torch.testing.assert_close(dm.members.features.x[0, tr], dm2.members.features.x[0, tr])


def test_unseen_category_and_missing_values_are_handled(house_dir):
    train, test = make_house_frames()
    test.loc[0, "Neighborhood"] = "Brand New"
    test.loc[1, "GrLivArea"] = np.nan
    dm = setup_house(write_house(house_dir, train, test), fold=0)
    assert torch.isfinite(dm.members.test_features.x).all()


@pytest.mark.parametrize("column", ["SalePrice", "Id"])
def test_missing_required_column_is_named(house_dir, column):
    train, test = make_house_frames()
    write_house(house_dir, train.drop(columns=column), test)
    with pytest.raises(DataError, match=rf"train\.csv.*'{column}'"):
        setup_house(house_dir)


def test_empty_csv(house_dir):
    (house_dir / "house-prices/train.csv").write_text("")
    with pytest.raises(DataError, match=r"train\.csv: file is empty"):
        setup_house(house_dir)


def test_header_only_csv(house_dir):
    (house_dir / "house-prices/train.csv").write_text("Id,SalePrice\n")
    with pytest.raises(DataError, match=r"train\.csv: no data rows"):
        setup_house(house_dir)


def test_text_in_numeric_column(house_dir):
    train, test = make_house_frames()
    train["GrLivArea"] = train["GrLivArea"].astype(object)
    train.loc[3, "GrLivArea"] = "big"
    write_house(house_dir, train, test)
    with pytest.raises(DataError, match=r"train\.csv: column 'GrLivArea' holds text \('big' in line 5\)"):
        setup_house(house_dir)


def test_infinite_value(house_dir):
    train, test = make_house_frames()
    train.loc[2, "TotalBsmtSF"] = np.inf
    write_house(house_dir, train, test)
    with pytest.raises(DataError, match=r"train\.csv: column 'TotalBsmtSF' line 4 is inf"):
        setup_house(house_dir)


def test_non_positive_target(house_dir):
    train, test = make_house_frames()
    train.loc[5, "SalePrice"] = 0
    write_house(house_dir, train, test)
    with pytest.raises(DataError, match=r"'SalePrice' row 7.*positive"):
        setup_house(house_dir)


def test_test_columns_must_match(house_dir):
    train, test = make_house_frames()
    write_house(house_dir, train, test.drop(columns="GrLivArea").assign(Extra=1))
    with pytest.raises(DataError, match=r"test\.csv: columns differ.*missing \['GrLivArea'\].*unexpected \['Extra'\]"):
        setup_house(house_dir)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"train\.csv: file not found"):
        setup_house(tmp_path)


def test_corrupt_csv(house_dir):
    (house_dir / "house-prices/train.csv").write_bytes(b'Id,SalePrice\n1,"200000\n2,3\x00\xff\xfe')
    with pytest.raises(DataError, match=r"train\.csv"):
        setup_house(house_dir)


# ---- IDX and MNIST pickle -------------------------------------------------------------------


def test_idx_datamodule_splits_are_stratified(idx_dir):
    dm = get_task("fashion-mnist").datamodule(idx_dir, n_folds=5, fold=0, batch_size=32)
    dm.setup()
    assert (len(dm.members.train_rows[0]), len(dm.members.val_rows[0]), dm.test_size) == (160, 40, 50)
    assert torch.bincount(dm.targets[dm.members.val_rows[0]], minlength=10).tolist() == [4] * 10
    batch = next(iter(dm.train_loader(32)))  # a chunk of 5 mini-batches of one-channel images
    assert batch["x"].shape == (5, 1, 32, 1, 28, 28) and batch["y"].dtype == torch.int64
    # normalisation fitted on the training part: standardised there, not on the validation part
    x = dm.members.features.gather(dm.members.train_rows[0][None])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda raw: struct.pack(">I", 0x00000999) + raw[4:], "magic number 0x00000999, expected 0x00000803"),
        (lambda raw: raw[:-100], "size .* bytes, expected"),
        (lambda raw: raw[:6], "header truncated"),
    ],
)
def test_bad_idx_files(idx_dir, damage, message):
    path = idx_dir / "fashion-mnist/train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(damage(raw)))
    with pytest.raises(DataError, match=rf"train-images-idx3-ubyte\.gz: {message}"):
        get_task("fashion-mnist").datamodule(idx_dir).setup()


def test_truncated_gzip_idx(idx_dir):
    path = idx_dir / "fashion-mnist/t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: cannot read"):
        read_idx(path, 1)


def test_mnist_pickle_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n)) for n in (30, 10, 10)]
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as stream:
        pickle.dump(tuple(parts), stream)
    mnist_pickle_to_idx(path, tmp_path)
    images = read_idx(tmp_path / "train-images-idx3-ubyte.gz", 3)
    assert images.shape == (40, 28, 28)
    np.testing.assert_array_equal(images[:30].reshape(30, -1), (parts[0][0] * 256).astype(np.uint8))


def test_mnist_pickle_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo should-not-run",))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as stream:
        pickle.dump(Evil(), stream)
    with pytest.raises(DataError, match=r"mnist\.pkl\.gz: not a valid MNIST pickle.*system is not allowed"):
        mnist_pickle_to_idx(path, tmp_path)


# ---- sources --------------------------------------------------------------------------------


def test_checksum_mismatch_names_file_and_hashes(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("Id,SalePrice\n1,2\n")
    with pytest.raises(
        sources.ChecksumError, match=r"train\.csv: checksum mismatch: expected sha256 0{64}; got sha256 [0-9a-f]{64}"
    ):
        sources.verify(path, {"sha256": "0" * 64})
    with pytest.raises(sources.ChecksumError, match=r"a data set name of its own .* --set data.dataset=<name>"):
        sources.verify(path, {"sha256": "0" * 64})  # and how to use one's own copy


def test_local_copy_with_wrong_checksum_is_an_error(house_dir):
    with pytest.raises(sources.ChecksumError, match=r"train\.csv"):
        sources.fetch_dataset("house-prices", house_dir)


def test_no_source_lists_what_was_tried(tmp_path, monkeypatch, capsys):
    def unreachable(names, workdir):
        raise OSError("host unreachable")

    monkeypatch.setattr(sources, "sources_for", lambda dataset: [("mirror A", unreachable), ("wheel B", unreachable)])
    with pytest.raises(DataError) as err:
        sources.fetch_dataset("mnist", tmp_path)
    text = str(err.value)
    assert "mirror A: host unreachable" in text and "wheel B: host unreachable" in text
    assert "Provide the files by hand" in text
    assert capsys.readouterr().err.count("skipped") == 2


# ---- batches --------------------------------------------------------------------------------


def test_each_member_sees_each_of_its_rows_once_per_epoch():
    features = MemberFeatures(torch.arange(3 * 10 * 1, dtype=torch.float32).view(3, 10, 1))
    rows = [torch.arange(0, 7), torch.arange(3, 10), torch.arange(0, 6)]
    loader = StackedBatches(features, torch.arange(10).float(), rows, batch_size=3, shuffle=True, seed=1)
    assert len(loader) == 3
    seen = [[] for _ in rows]
    for batch in loader:
        for m in range(3):
            seen[m] += batch["y"][m][batch["w"][m] > 0].long().tolist()
    assert [sorted(s) for s in seen] == [r.tolist() for r in rows]


def test_member_batches_are_the_same_alone_or_stacked():
    x = torch.randn(2, 20, 3)
    rows = [torch.arange(0, 15), torch.arange(5, 20)]
    stacked = StackedBatches(MemberFeatures(x), torch.zeros(20), rows, 4, shuffle=True, seed=3, seed_ids=[0, 1])
    alone = StackedBatches(MemberFeatures(x[1:]), torch.zeros(20), rows[1:], 4, shuffle=True, seed=3, seed_ids=[1])
    for a, b in zip(stacked, alone):
        torch.testing.assert_close(a["x"][1:], b["x"])


# ---- the real files (CI fetches them) ---------------------------------------------------------


@pytest.mark.slow
def test_real_house_prices_fold_sizes(real_data):
    """Fold 0 trains on 1168 rows less the partial sale among them, and is scored on all its 292."""
    dm = setup_house(real_data, n_folds=5, fold=0)
    assert (len(dm.members.train_rows[0]), len(dm.members.val_rows[0]), dm.test_size) == (1167, 292, 1459)
    ids = dm.train_frame["Id"].to_numpy()
    left_out = set(range(1460)) - set(dm.members.train_rows[0].tolist()) - set(dm.members.val_rows[0].tolist())
    assert {int(ids[r]) for r in left_out} <= {1299, 524} and len(left_out) == 1
    assert dm.test_ids.tolist() == list(range(1461, 2920))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_real_image_fold_sizes(real_data, name):
    if not (real_data / name / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{name} not fetched")
    dm = get_task(name).datamodule(real_data, n_folds=5, fold=0)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.members.train_rows[0]), len(dm.members.val_rows[0]), dm.test_size) == (48000, 12000, 10000)
    assert torch.bincount(dm.test_targets).tolist() == (
        [1000] * 10 if name == "fashion-mnist" else [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )


@pytest.mark.slow
def test_real_files_verify(real_data):
    for dataset in sources.DATASETS:
        paths = sources.fetch_dataset(dataset, real_data)
        assert all(p.is_file() for p in paths.values())


def test_quantile_clipper_bounds_held_out_values():
    clipper = QuantileClipper(0.1).fit(np.arange(11, dtype=float)[:, None])
    np.testing.assert_allclose(clipper.transform(np.array([[-50.0], [5.0], [1e9]])), [[1.0], [5.0], [9.0]])


def test_random_translate_shifts_each_image_within_bounds():
    images = torch.zeros(64, 2, 6, 6, dtype=torch.uint8)  # two channels
    images[:, :, 2:4, 2:4] = 255
    moved = random_translate(images, 2, torch.Generator().manual_seed(0))
    assert moved.shape == images.shape and moved.dtype == torch.uint8
    assert (moved.flatten(1).sum(1) == 2 * 255 * 4).all()  # a centred patch never leaves the frame
    assert torch.equal(moved[:, 0], moved[:, 1])  # the channels of an image move together
    assert len({tuple(m[0].nonzero()[0].tolist()) for m in moved}) > 5  # offsets differ between images
    again = random_translate(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)


def test_sparse_rows_travel_as_their_nonzero_entries():
    """One-hot tables are mostly zeros: batches carry each row's nonzero columns and values, which
    rebuild the dense features exactly; dense rows and images carry none."""
    torch.manual_seed(0)
    x = torch.zeros(2, 30, 12).scatter_(-1, torch.rand(2, 30, 12).argsort(-1)[..., :4], torch.randn(2, 30, 4))
    x[1, 4] = 0  # an all-zero row
    x[0, 3] = torch.arange(12) < 6  # the widest row: half its columns
    features = MemberFeatures(x)
    index, value = features.nonzero
    assert index.dtype == torch.int32 and index.shape == value.shape
    assert index.shape[-1] == 6
    rebuilt = torch.zeros_like(x).scatter_add_(-1, index.long(), value)
    torch.testing.assert_close(rebuilt, x, rtol=0, atol=0)

    batches = StackedBatches(
        features,
        torch.zeros(30),
        [torch.arange(30), torch.arange(20)],
        batch_size=8,
        shuffle=True,
        chunk_steps=2,
        nonzero=True,
    )
    x = next(iter(batches))["x"]
    assert x.columns.shape[:-1] == x.dense.shape[:-1]
    rebuilt = torch.zeros_like(x.dense).scatter_add_(-1, x.columns.long(), x.value)
    torch.testing.assert_close(rebuilt, x.dense, rtol=0, atol=0)

    assert MemberFeatures(torch.randn(2, 30, 12)).nonzero is None
    assert isinstance(
        next(
            iter(
                StackedBatches(
                    MemberFeatures(torch.randn(1, 30, 12)), None, [torch.arange(30)], batch_size=8, nonzero=True
                )
            )
        )["x"],
        torch.Tensor,
    )  # dense rows
    images = MemberFeatures(torch.zeros(30, 784, dtype=torch.uint8), torch.zeros(1), torch.ones(1), (1, 28, 28))
    assert images.nonzero is None


@pytest.mark.parametrize("shared", [False, True])
def test_batches_are_cut_on_the_device_the_model_trains_on(shared):
    """Features and targets are copied to the training device once, and every index is moved there
    before a batch is cut: on torch's ``meta`` device (shapes without data) every tensor of every
    batch lands there, which a GPU's would too; on the CPU nothing is copied."""
    from project.data.batches import MemberFeatures, StackedBatches

    if shared:  # images: one uint8 table, each member's own pixel statistics, random shifts
        features = MemberFeatures(
            torch.randint(0, 255, (40, 1 * 6 * 6), dtype=torch.uint8), torch.zeros(2), torch.ones(2), (1, 6, 6)
        )
    else:
        features = MemberFeatures(torch.randn(2, 40, 5))
    assert features.to(torch.device("cpu")) is features
    assert features.to(torch.device("meta")) is features.to(torch.device("meta"))  # copied once
    rows = [torch.arange(0, 30), torch.arange(10, 40)]
    batches = StackedBatches(
        features,
        torch.randn(40),
        rows,
        8,
        shuffle=True,
        chunk_steps=2,
        augment=Augment(translate=2) if shared else None,
        device=torch.device("meta"),
    )
    for batch in batches:
        assert {t.device.type for t in (batch["x"], batch["y"], batch["w"], batch["rows"])} == {"meta"}
    on_cpu = StackedBatches(features, torch.randn(40), rows, 8, shuffle=True, device=torch.device("cpu"))
    plain = StackedBatches(features, on_cpu.targets, rows, 8, shuffle=True)
    for a, b in zip(on_cpu, plain):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])


def test_quantile_scaling_maps_training_rows_to_a_normal_and_held_out_extremes_to_its_edge(house_dir):
    """``scaler: quantile``: each numeric column through its training rows' quantiles onto a
    standard normal, fitted per fold on training rows only; a saved predictor reloads it."""
    from sklearn.preprocessing import QuantileTransformer

    train, _ = make_house_frames()
    dm = setup_house(house_dir, fold=0)
    tr, val = dm.members.train_rows[0].numpy(), dm.members.val_rows[0].numpy()
    quantile = FoldPreprocessor(dm.spec, PreprocessOptions(scaler="quantile", skew_threshold=None)).fit(train.iloc[tr])
    scaler = quantile.columns_.named_transformers_["numeric"][-1]
    assert isinstance(scaler, QuantileTransformer) and scaler.n_quantiles_ == len(tr)
    area = list(quantile.columns_.transformers_[0][2]).index("GrLivArea")
    column = quantile.transform(train.iloc[tr])[:, area]
    raw = train.iloc[tr]["GrLivArea"].to_numpy()
    assert abs(np.median(column)) < 0.1 and -6 < column.min() < -5 < 5 < column.max() < 6  # a normal's quantiles
    assert np.array_equal(np.argsort(column, kind="stable"), np.argsort(raw, kind="stable"))  # the order kept
    extreme = train.iloc[val].copy()
    extreme["GrLivArea"] = 1e7
    assert np.allclose(quantile.transform(extreme)[:, area], column.max())  # the edge its training rows reach
    with pytest.raises(PresetError, match=r"key 'data.preprocess.scaler': 'minmax'"):
        load_preset(preset_path("house-prices"), ["data.preprocess.scaler=minmax"])


def test_a_quantile_scaled_model_saves_and_reloads(house_dir, tmp_path):
    from project.artifacts.predictor import Predictor, load_predictor
    from project.config import TrainConfig
    from project.cv import cross_validate
    from project.tasks import Task

    task = Task(load_preset(preset_path("house-prices"), ["data.preprocess.scaler=quantile"]))
    dm = task.datamodule(data_dir=house_dir, n_folds=3, fold=[0, 1, 2])
    dm.setup()
    config = TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=2)
    predictor = Predictor.from_fits(task, config, cross_validate(task, config, datamodule=dm).fits, dm)
    test = pd.read_csv(house_dir / "house-prices" / "test.csv")
    reloaded = load_predictor(predictor.save(tmp_path / "model"))
    torch.testing.assert_close(reloaded.averaged(test), predictor.averaged(test))
