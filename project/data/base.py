"""K-fold plumbing shared by every DataModule: fold selection, splits, in-memory loaders."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from project.config import Augment, Preset, PresetError
from project.data.batches import MemberFeatures, StackedBatches
from project.data.sources import DATASETS, fetch_dataset

CHUNK_ELEMENTS = 4 * 1024 * 1024
# input elements per member in one evaluation pass: thousands of images in one pass spill a conv
# net's activations out of the CPU caches, and a pass of a few hundred takes less time per row
EVAL_ELEMENTS = 256 * 1024


class FoldRows(Dataset):
    """One member's rows as standard samples, ``(x, y)`` or ``x``, cut a batch at a time: the
    DataLoader hands ``__getitems__`` the batch's positions and passes its result on as it is."""

    def __init__(self, features: MemberFeatures, rows: Tensor, targets: Tensor | None) -> None:
        self.features, self.rows, self.targets = features, rows, targets

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor] | Tensor:
        rows = self.rows[torch.as_tensor(positions)]
        x = self.features.gather(rows[None])[0]
        return x if self.targets is None else (x, self.targets[rows])

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor] | Tensor:
        batch = self.__getitems__([position])
        return batch[0] if isinstance(batch, Tensor) else (batch[0][0], batch[1][0])


def _as_is(batch: Any) -> Any:
    return batch


def kfold_indices(
    n_folds: int, seed: int, targets: np.ndarray, stratified: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, validation) row indices of each fold; identical for every configuration."""
    if stratified:
        splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(targets)), targets))


@dataclass(frozen=True)
class Members:
    """What a stack of members trains and is scored on, one entry per member: the fold it is
    validated on (None for a refit replica), the id that seeds its initialisation and batches,
    its training and validation rows, and its features (preprocessing fitted on its training rows)."""

    folds: list[int | None]
    seed_ids: list[int]
    train_rows: list[Tensor]
    val_rows: list[Tensor]
    features: MemberFeatures
    test_features: MemberFeatures
    # what turned each member's raw rows into its features, where that was fitted (tables)
    preprocessors: list | None = None

    def __len__(self) -> int:
        return len(self.folds)

    @property
    def validates(self) -> bool:
        """False for the final refit on every training row."""
        return self.folds[0] is not None

    def select(self, positions: Sequence[int]) -> Members:
        """The members at ``positions``, e.g. one fold to train alone."""
        positions = list(positions)
        return Members(
            [self.folds[p] for p in positions],
            [self.seed_ids[p] for p in positions],
            [self.train_rows[p] for p in positions],
            [self.val_rows[p] for p in positions],
            self.features.select(positions),
            self.test_features.select(positions),
            None if self.preprocessors is None else [self.preprocessors[p] for p in positions],
        )


class FoldDataModule(L.LightningDataModule):
    """Serves one fold, several folds stacked as members, or all rows (``fold=None``).

    ``fold=k`` trains on the other folds and validates on fold ``k``; a list of folds stacks them
    as members of one batched model; ``None`` trains on every training row and has no validation
    set (the final refit), with ``replicas`` members that differ only in their seeds (an ensemble).
    Preprocessing is fitted per member on its training rows only. After ``setup()``, ``members``
    says what each member trains on; the loaders serve them all, or the ``Members`` given.

    A subclass registered as a data kind (``project.data.kinds``) also says how a preset's ``data``
    section builds it, what that section must hold, and how raw inputs become the features its
    members were trained on, at prediction time.
    """

    stratified: bool = False
    tabular: ClassVar[bool] = False  # rows of a table, which scikit-learn estimators can fit beside the trials

    @classmethod
    def from_preset(cls, preset: Preset, **common: Any) -> FoldDataModule:
        """The DataModule a preset's ``data`` describes; ``common``: the folds, seed and batch size."""
        return cls(**common)

    @classmethod
    def check_preset(cls, preset: Preset, path: Path) -> None:
        """Refuse (``PresetError``) a ``data`` section this kind cannot read."""

    @classmethod
    def check_files(cls, preset: Preset, data_dir: Path) -> None:
        """Refuse (``PresetError``) data that is not there, before any work; a data set with pinned
        sources (data/checksums.json) may be missing: it is fetched."""
        folder = Path(data_dir) / preset.data.dataset
        if preset.data.dataset not in DATASETS and not folder.is_dir():
            raise PresetError(
                f"{preset.source}: key 'data.dataset': {folder} is not a folder; expected the data set there"
            )

    @classmethod
    def features_of(cls, preset: Preset, raw: Any, inputs: dict, preprocessors: list | None) -> MemberFeatures:
        """Raw inputs (as the test split holds them) as the features of a saved predictor's members:
        ``inputs`` and ``preprocessors`` are what it saved of their training data."""
        raise NotImplementedError

    def __init__(
        self,
        dataset: str,
        data_dir: str | Path = "data",
        n_folds: int = 5,
        fold: int | Sequence[int] | None = 0,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 4096,
        replicas: int = 1,
        stratified: bool | None = None,
    ) -> None:
        super().__init__()
        self.dataset = dataset  # the folder under data_dir
        if stratified is not None:
            self.stratified = stratified
        if replicas < 1 or (replicas > 1 and fold is not None):
            raise ValueError(f"replicas={replicas} is invalid: expected 1, or more with fold=None (the final refit)")
        if fold is not None and n_folds < 2:
            raise ValueError(f"n_folds must be at least 2 for K-fold validation, got {n_folds}")
        folds = [] if fold is None else [fold] if isinstance(fold, int) else list(fold)
        bad = [f for f in folds if not 0 <= f < n_folds]
        if bad:
            raise ValueError(f"fold {bad[0]} is out of range: expected 0..{n_folds - 1} for n_folds={n_folds}")
        self.data_dir, self.n_folds, self.seed = Path(data_dir), n_folds, seed
        self.folds: list[int | None] = list(folds) or [None] * replicas
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self._members: Members | None = None
        self._serving: tuple[StackedBatches, StackedBatches | list] | None = None

    @property
    def members(self) -> Members:
        """What each member trains and is scored on (after ``setup()``)."""
        if self._members is None:
            raise RuntimeError(f"{type(self).__name__} is not set up: call prepare_data() and setup() first")
        return self._members

    @property
    def validates(self) -> bool:
        return self.folds[0] is not None

    def prepare_data(self) -> None:
        # Trainer.fit calls this on every fit: once the data is loaded it has nothing to do. A data set
        # of your own, without pinned checksums, is read from data_dir as it is.
        if self._members is None and self.dataset in DATASETS:
            fetch_dataset(self.dataset, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._members is not None:
            return
        targets = self.load()
        if not self.validates:
            all_rows = np.arange(len(targets))
            splits = [(all_rows, all_rows[:0])] * len(self.folds)
        else:
            every_fold = kfold_indices(self.n_folds, self.seed, targets, self.stratified)
            splits = [every_fold[f] for f in self.folds if f is not None]
        train_parts = [self.training_part(tr) for tr, _ in splits]
        features, test_features, preprocessors = self.fit_features(train_parts)
        # what seeds a member: its fold, or for refit replica r, n_folds + r
        seed_ids = [self.n_folds + r if f is None else f for r, f in enumerate(self.folds)]
        self._members = Members(
            list(self.folds),
            seed_ids,
            [torch.from_numpy(tr) for tr in train_parts],
            [torch.from_numpy(va) for _, va in splits],
            features,
            test_features,
            preprocessors,
        )

    def training_part(self, rows: np.ndarray) -> np.ndarray:
        """The rows of a fold's training part that are trained on; validation parts are never cut."""
        return rows

    # subclasses: read the raw files, then fit the per-member preprocessing
    def load(self) -> np.ndarray:
        """Read the data; return the training targets used for splitting."""
        raise NotImplementedError

    def fit_features(self, train_rows: list[np.ndarray]) -> tuple[MemberFeatures, MemberFeatures, list | None]:
        """Fit preprocessing on each member's training rows; return the train-set and test-set
        features, and the fitted preprocessors where there are any."""
        raise NotImplementedError

    targets: Tensor
    test_targets: Tensor | None = None  # where the test split has labels (images)
    test_ids: np.ndarray  # one id per test row, in file order

    @property
    def out_features(self) -> int:
        """Outputs a model needs: 1 for regression, the number of classes for classification."""
        raise NotImplementedError

    def test_inputs(self):
        """The test split as it was read, before any preprocessing: what a trained model predicts from."""
        raise NotImplementedError

    def data_files(self) -> dict:
        """Where each split came from, for the record: ``{"training" | "testing": (path, the frame as
        read, or the files)}``."""
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample as a model sees it: ``(F,)`` for table rows, ``(C, H, W)`` for images."""
        return self.members.features.sample_shape

    @property
    def n_features(self) -> int:
        return math.prod(self.sample_shape)

    @property
    def test_size(self) -> int:
        return self.members.test_features.n_rows

    @property
    def eval_rows(self) -> int:
        """Rows per evaluation pass: ``eval_batch_size`` at most, fewer for large samples."""
        return max(1, min(self.eval_batch_size, EVAL_ELEMENTS // self.n_features))

    def train_loader(
        self,
        batch_size: int,
        members: Members | None = None,
        chunked: bool = True,
        nonzero: bool = False,
        augment: Augment | None = None,
        device: torch.device | None = None,
    ) -> StackedBatches:
        """Shuffled training batches of each member's rows; ``chunked``: chunks of consecutive
        mini-batches (about 16 MB of features each), for a module that steps its optimiser once
        per mini-batch and so pays the Trainer's per-item overhead once per chunk. Images are
        augmented as ``augment`` says (project/data/augment.py); no other loader augments."""
        members = members or self.members
        chunk = max(1, CHUNK_ELEMENTS // (len(members) * batch_size * self.n_features)) if chunked else None
        return StackedBatches(
            members.features,
            self.targets,
            members.train_rows,
            batch_size,
            shuffle=True,
            seed=self.seed,
            seed_ids=members.seed_ids,
            chunk_steps=chunk,
            augment=augment,
            nonzero=nonzero,
            device=device,
        )

    def val_loader(
        self, members: Members | None = None, nonzero: bool = False, device: torch.device | None = None
    ) -> StackedBatches | list:
        members = members or self.members
        if not members.validates:
            return []
        return StackedBatches(
            members.features, self.targets, members.val_rows, self.eval_rows, nonzero=nonzero, device=device
        )

    def test_loader(
        self,
        members: Members | None = None,
        nonzero: bool = False,
        with_targets: bool = True,
        device: torch.device | None = None,
    ) -> StackedBatches:
        """Every test row for every member; targets where the test split has them and they are wanted."""
        members = members or self.members
        rows = [torch.arange(self.test_size)] * len(members)
        targets = self.test_targets if with_targets else None
        return StackedBatches(members.test_features, targets, rows, self.eval_rows, nonzero=nonzero, device=device)

    @contextlib.contextmanager
    def serving(self, train: StackedBatches, val: StackedBatches | list) -> Iterator[FoldDataModule]:
        """While the block runs, the hooks below serve the engine's fold-stacked batches of one fit
        (``train_loader`` and ``val_loader``), so that its Trainer is handed this DataModule itself
        (``trainer.fit(module, datamodule=...)``): a callback or module reading
        ``trainer.datamodule`` finds it, its data and its members."""
        self._serving = (train, val)
        try:
            yield self
        finally:
            self._serving = None

    # The LightningDataModule hooks: the standard batches of one fold, ``(x, y)`` with ``x`` batch
    # first (``[B, F]`` for table rows, ``[B, C, H, W]`` for images) and ``y`` ``[B]``, with the
    # fold's own preprocessing, for any LightningModule and a plain Trainer; inside ``serving``,
    # the engine's fold-stacked batches, cut from the same prepared data.
    def train_dataloader(self) -> DataLoader | StackedBatches:
        if self._serving is not None:
            return self._serving[0]
        member = self._one_member()
        return self._plain_loader(member.features, member.train_rows[0], self.targets, shuffle=True)

    def val_dataloader(self) -> DataLoader | StackedBatches | list:
        if self._serving is not None:
            return self._serving[1]
        if not self.validates:
            return []
        member = self._one_member()
        return self._plain_loader(member.features, member.val_rows[0], self.targets)

    def test_dataloader(self) -> DataLoader:
        """``(x, y)`` where the test split has labels (the images' official test set), else ``x``."""
        return self._plain_loader(self._one_member().test_features, torch.arange(self.test_size), self.test_targets)

    def predict_dataloader(self) -> DataLoader:
        """The test rows' ``x`` alone, in file order."""
        return self._plain_loader(self._one_member().test_features, torch.arange(self.test_size), None)

    def _one_member(self) -> Members:
        if len(self.members) != 1:
            raise ValueError(
                f"the standard loaders serve one fold, and this {type(self).__name__} holds {len(self.members)} "
                "members: build it with fold=<k> (or fold=None for every training row)"
            )
        return self.members

    def _plain_loader(
        self, features: MemberFeatures, rows: Tensor, targets: Tensor | None, shuffle: bool = False
    ) -> DataLoader:
        batch_size = self.batch_size if shuffle else self.eval_rows
        # shuffled from torch's global generator, as any DataLoader: L.seed_everything makes it repeat
        return DataLoader(FoldRows(features, rows, targets), batch_size, shuffle=shuffle, collate_fn=_as_is)
