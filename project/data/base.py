"""K-fold plumbing shared by every DataModule: fold selection, splits, in-memory loaders."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from sklearn.model_selection import KFold, StratifiedKFold
from torch import Tensor

from project.data.batches import MemberFeatures, StackedBatches
from project.data.sources import DATASETS, fetch_dataset


CHUNK_ELEMENTS = 4 * 1024 * 1024


def kfold_indices(n_folds: int, seed: int, targets: np.ndarray, stratified: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, validation) row indices of each fold; identical for every configuration."""
    if stratified:
        splitter = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_folds, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(targets)), targets))


class FoldDataModule(L.LightningDataModule):
    """Serves one fold, several folds stacked as members, or all rows (``fold=None``).

    ``fold=k`` trains on the other folds and validates on fold ``k``; a list of folds stacks them
    as members of one batched model; ``None`` trains on every training row and has no validation
    set (the final refit), with ``replicas`` members that differ only in their seeds (an ensemble).
    Preprocessing is fitted per member on its training rows only.
    """

    dataset: str = ""
    stratified: bool = False

    def __init__(
        self,
        data_dir: str | Path = "data",
        n_folds: int = 5,
        fold: int | Sequence[int] | None = 0,
        seed: int = 0,
        batch_size: int = 64,
        eval_batch_size: int = 4096,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        if replicas < 1 or (replicas > 1 and fold is not None):
            raise ValueError(f"replicas={replicas} is invalid: expected 1, or more with fold=None (the final refit)")
        if fold is not None and n_folds < 2:
            raise ValueError(f"n_folds must be at least 2 for K-fold validation, got {n_folds}")
        folds = [] if fold is None else [fold] if isinstance(fold, int) else list(fold)
        bad = [f for f in folds if not 0 <= f < n_folds]
        if bad:
            raise ValueError(f"fold {bad[0]} is out of range: expected 0..{n_folds - 1} for n_folds={n_folds}")
        self.data_dir, self.n_folds, self.seed = Path(data_dir), n_folds, seed
        self.folds: list[int | None] = folds or [None] * replicas
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.translate = 0  # training-time random shift of images, in pixels (set per configuration)
        self._ready = False

    @property
    def n_members(self) -> int:
        return len(self.folds)

    @property
    def validates(self) -> bool:
        """False for the final refit on every training row."""
        return self.folds[0] is not None

    def prepare_data(self) -> None:
        # Trainer.fit calls this on every fit: once the data is loaded it has nothing to do. A data set
        # of your own, without pinned checksums, is read from data_dir as it is.
        if not self._ready and self.dataset in DATASETS:
            fetch_dataset(self.dataset, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._ready:
            return
        targets = self.load()
        if not self.validates:
            all_rows = np.arange(len(targets))
            splits = [(all_rows, all_rows[:0])] * self.n_members
        else:
            every_fold = kfold_indices(self.n_folds, self.seed, targets, self.stratified)
            splits = [every_fold[f] for f in self.folds]
        train_parts = [self.training_part(tr) for tr, _ in splits]
        self.train_rows: list[Tensor] = [torch.from_numpy(tr) for tr in train_parts]
        self.val_rows: list[Tensor] = [torch.from_numpy(va) for _, va in splits]
        self.features, self.test_features = self.fit_features(train_parts)
        self._ready = True

    def training_part(self, rows: np.ndarray) -> np.ndarray:
        """The rows of a fold's training part that are trained on; validation parts are never cut."""
        return rows

    # subclasses: read the raw files, then fit the per-member preprocessing
    def load(self) -> np.ndarray:
        """Read the data; return the training targets used for splitting."""
        raise NotImplementedError

    def fit_features(self, train_rows: list[np.ndarray]) -> tuple[MemberFeatures, MemberFeatures]:
        """Fit preprocessing on each member's training rows; return (train-set, test-set) features."""
        raise NotImplementedError

    targets: Tensor
    test_targets: Tensor | None = None

    @property
    def n_features(self) -> int:
        return self.features.n_features

    def train_dataloader(self) -> StackedBatches:
        """Chunks of consecutive mini-batches (about 16 MB of features each): the module steps the
        optimiser once per mini-batch, and the Trainer's per-item overhead is paid once per chunk."""
        per_step = self.n_members * self.batch_size * self.n_features
        chunk = max(1, CHUNK_ELEMENTS // per_step)
        return StackedBatches(self.features, self.targets, self.train_rows, self.batch_size,
                              shuffle=True, seed=self.seed, member_ids=self.member_ids(), chunk_steps=chunk,
                              translate=self.translate)

    def val_dataloader(self) -> StackedBatches | list:
        if not self.validates:
            return []
        return StackedBatches(self.features, self.targets, self.val_rows, self.eval_batch_size)

    def test_dataloader(self) -> StackedBatches:
        rows = [torch.arange(self.test_size)] * self.n_members
        return StackedBatches(self.test_features, self.test_targets, rows, self.eval_batch_size)

    def predict_dataloader(self) -> StackedBatches:
        rows = [torch.arange(self.test_size)] * self.n_members
        return StackedBatches(self.test_features, None, rows, self.eval_batch_size)

    @property
    def test_size(self) -> int:
        return self.test_features.x.shape[0] if self.test_features.shared else self.test_features.x.shape[1]

    def member_ids(self) -> list[int]:
        """What seeds each member's initialisation and batches: its fold, or for refit replica r,
        n_folds + r."""
        return [self.n_folds + r if f is None else f for r, f in enumerate(self.folds)]
