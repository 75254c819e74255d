"""Fashion-MNIST and MNIST: the official 60k/10k IDX split, validation folds over the 60k."""

from __future__ import annotations

import numpy as np
import torch

from project.data.base import FoldDataModule
from project.data.batches import MemberFeatures
from project.data.idx import load_idx_set


class FashionMNISTDataModule(FoldDataModule):
    """Validation by StratifiedKFold over the 60k training images (fold k of 5: 48000 / 12000);
    pixel mean and std fitted on each member's training part; the official 10k test set untouched."""

    dataset = "fashion-mnist"
    stratified = True
    n_classes = 10

    def load(self) -> np.ndarray:
        x_train, y_train, x_test, y_test = load_idx_set(self.data_dir / self.dataset)
        self.image_shape = (1, *x_train.shape[1:])  # grey images: one channel
        # pixels stay uint8 in memory; batches are normalised per member when cut
        self.images = torch.from_numpy(x_train.reshape(len(x_train), -1).copy())
        self.test_images = torch.from_numpy(x_test.reshape(len(x_test), -1).copy())
        self.targets = torch.from_numpy(y_train.astype(np.int64))
        self.test_targets = torch.from_numpy(y_test.astype(np.int64))
        return y_train

    def fit_features(self, train_rows: list[np.ndarray]) -> tuple[MemberFeatures, MemberFeatures]:
        mean, std = [], []
        for rows in train_rows:
            pixels = self.images[torch.from_numpy(rows)].double()
            mean.append(pixels.mean())
            std.append(pixels.std())
        shift, scale = torch.stack(mean).float(), torch.stack(std).float()
        return (MemberFeatures(self.images, shift, scale, self.image_shape),
                MemberFeatures(self.test_images, shift, scale, self.image_shape))


class MNISTDataModule(FashionMNISTDataModule):
    """MNIST digits, in the same format and with the same splits as Fashion-MNIST."""

    dataset = "mnist"
