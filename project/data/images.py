"""Image sets: MNIST-format IDX files (Fashion-MNIST, MNIST), or a folder of image files per class.

Validation folds are stratified over the training images; pixel mean and standard deviation are
fitted on each member's training part; the test split is only scored at the end. Pixels stay
uint8 in memory and are normalised per member when a batch is cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.config import Preset
from project.data.base import FoldDataModule
from project.data.batches import MemberFeatures
from project.data.errors import DataError
from project.data.idx import load_idx_set
from project.data.kinds import register_data_kind

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")


class ImageDataModule(FoldDataModule):
    """What every image set shares once loaded: ``images`` ``[N, C*H*W]`` uint8, ``image_shape``
    ``(C, H, W)``, integer targets, and ``classes`` naming them."""

    stratified = True
    classes: list  # the class names (or numbers), set by load()

    @classmethod
    def features_of(cls, preset: Preset, raw: Any, inputs: dict, preprocessors: list | None) -> MemberFeatures:
        """Images ``[N, C, H, W]`` of uint8 pixels, normalised by each member's training statistics."""
        pixels = torch.as_tensor(np.asarray(raw, dtype=np.uint8)).reshape(len(raw), -1)
        return MemberFeatures(
            pixels, torch.tensor(inputs["shift"]), torch.tensor(inputs["scale"]), tuple(inputs["sample_shape"])
        )

    @property
    def out_features(self) -> int:
        return len(self.classes)

    def fit_features(self, train_rows: list[np.ndarray]) -> tuple[MemberFeatures, MemberFeatures, None]:
        mean, std = [], []
        for rows in train_rows:
            pixels = self.images[torch.from_numpy(rows)].double()
            mean.append(pixels.mean())
            std.append(pixels.std())
        shift, scale = torch.stack(mean).float(), torch.stack(std).float()
        return (
            MemberFeatures(self.images, shift, scale, self.image_shape),
            MemberFeatures(self.test_images, shift, scale, self.image_shape),
            None,
        )

    def test_inputs(self) -> np.ndarray:
        """The test images, ``[N, C, H, W]`` uint8."""
        return self.test_images.numpy().reshape(len(self.test_images), *self.image_shape)

    def _keep(
        self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray | None
    ) -> np.ndarray:
        self.image_shape = tuple(x_train.shape[1:])
        self.images = torch.from_numpy(x_train.reshape(len(x_train), -1).copy())
        self.test_images = torch.from_numpy(x_test.reshape(len(x_test), -1).copy())
        self.targets = torch.from_numpy(y_train.astype(np.int64))
        self.test_targets = None if y_test is None else torch.from_numpy(y_test.astype(np.int64))
        return y_train


@register_data_kind("idx")
class IdxDataModule(ImageDataModule):
    """The official train/test split of an MNIST-format set: four IDX files under data/<dataset>/."""

    def data_files(self) -> dict:
        folder = self.data_dir / self.dataset
        return {
            context: (
                folder / f"{prefix}-images-idx3-ubyte.gz",
                [folder / f"{prefix}-{kind}-idx{n}-ubyte.gz" for kind, n in (("images", 3), ("labels", 1))],
            )
            for context, prefix in (("training", "train"), ("testing", "t10k"))
        }

    def load(self) -> np.ndarray:
        x_train, y_train, x_test, y_test = load_idx_set(self.data_dir / self.dataset)
        self.classes = list(range(int(max(y_train.max(), y_test.max())) + 1))
        self.test_ids = np.arange(len(x_test))
        return self._keep(x_train[:, None], y_train, x_test[:, None], y_test)  # grey: one channel


@register_data_kind("image-folder")
class ImageFolderDataModule(ImageDataModule):
    """``train/<class>/<image>`` files, one folder per class; ``test/<class>/<image>`` (scored) or
    ``test/<image>`` (unlabelled: predictions only). Images are read with Pillow, grey when every
    training image is grey, else RGB, and resized to ``image_size`` where given; without it every
    image must have the size of the first."""

    def __init__(
        self, train_dir: str = "train", test_dir: str = "test", image_size: Sequence[int] | None = None, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.train_dir, self.test_dir = train_dir, test_dir
        self.image_size = tuple(image_size) if image_size else None

    @classmethod
    def from_preset(cls, preset: Preset, **common: Any) -> ImageFolderDataModule:
        data = preset.data
        return cls(train_dir=data.train or "train", test_dir=data.test or "test", image_size=data.image_size, **common)

    def data_files(self) -> dict:
        root = self.data_dir / self.dataset
        return {
            context: (root / folder, sorted(f for f in (root / folder).rglob("*") if f.is_file()))
            for context, folder in (("training", self.train_dir), ("testing", self.test_dir))
        }

    def load(self) -> np.ndarray:
        root = self.data_dir / self.dataset
        train = root / self.train_dir
        class_dirs = sorted(p for p in train.iterdir() if p.is_dir()) if train.is_dir() else []
        if len(class_dirs) < 2:
            raise DataError(
                f"{train}: expected one folder of images per class, at least two; found "
                f"{len(class_dirs) if train.is_dir() else 'no folder'}"
            )
        self.classes = [p.name for p in class_dirs]
        files = [(f, label) for label, d in enumerate(class_dirs) for f in _image_files(d)]
        test = root / self.test_dir
        labelled = test.is_dir() and any(p.is_dir() for p in test.iterdir())
        if labelled:
            unknown = sorted({p.name for p in test.iterdir() if p.is_dir()} - set(self.classes))
            if unknown:
                raise DataError(f"{test}: class folders {unknown} have no training folder in {train}")
            test_files = [
                (f, self.classes.index(d.name))
                for d in sorted(p for p in test.iterdir() if p.is_dir())
                for f in _image_files(d)
            ]
        else:
            test_files = [(f, -1) for f in _image_files(test)] if test.is_dir() else []
        if not test_files:
            raise DataError(f"{test}: no test images; expected {test}/<class>/<image> or {test}/<image>")
        from PIL import Image

        grey = all(_mode(f, Image) == "L" for f, _ in files)
        size = self.image_size or _size(files[0][0], Image)[::-1]
        resize = self.image_size is not None
        x_train = _read_all([f for f, _ in files], grey, size, resize, Image)
        x_test = _read_all([f for f, _ in test_files], grey, size, resize, Image)
        self.test_ids = np.array([str(f.relative_to(test)) for f, _ in test_files], dtype=object)
        y_test = np.array([label for _, label in test_files]) if labelled else None
        return self._keep(x_train, np.array([label for _, label in files]), x_test, y_test)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _mode(path: Path, image_module) -> str:
    try:
        with image_module.open(path) as image:
            return "L" if image.mode in ("L", "1", "I;16", "I") else image.mode
    except OSError as err:
        raise DataError(f"{path}: not a readable image: {err}") from None


def _size(path: Path, image_module) -> tuple[int, int]:
    with image_module.open(path) as image:
        return image.size


def _read_all(paths: list[Path], grey: bool, size: tuple[int, ...], resize: bool, image_module) -> np.ndarray:
    """``[N, C, H, W]`` uint8; ``size`` is (height, width): images of another size are resized to it,
    or refused."""
    height, width = size
    out = np.empty((len(paths), 1 if grey else 3, height, width), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with image_module.open(path) as image:
                image = image.convert("L" if grey else "RGB")
                if image.size != (width, height):
                    if not resize:
                        raise DataError(
                            f"{path}: {image.size[0]}x{image.size[1]} pixels, expected {width}x{height} "
                            "as the first training image; give data.image_size to resize them all"
                        )
                    image = image.resize((width, height), image_module.Resampling.BILINEAR)
                array = np.asarray(image)
        except OSError as err:
            raise DataError(f"{path}: not a readable image: {err}") from None
        out[i] = array[None] if grey else array.transpose(2, 0, 1)
    return out
