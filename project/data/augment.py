"""Augmentation of training images: random crops of padded images, mirror images and random
erasing, each drawn per image from the training loader's own seeded generator.

Only a training loader augments (``FoldDataModule.train_loader``); validation, test and
prediction batches are the images as they are. The draws happen on the raw pixels, before the
fold's normalisation, so padding and erased patches are black, as Fashion-MNIST's background is.
A preset sets them for every model of an image task in its ``data.augment`` section, and a sweep
may search them like any training setting (``translate``, ``flip``, ``erase``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from project.config import Augment

# random erasing's rectangle, as torchvision's RandomErasing draws it: 2 % to a third of the image,
# its aspect ratio log-uniform between 0.3 and 3.3
ERASE_AREA = (0.02, 1 / 3)
ERASE_ASPECT = (0.3, 3.3)


def augmented(images: Tensor, settings: Augment, generator: torch.Generator | None) -> Tensor:
    """``images`` ``[N, C, H, W]``, each augmented on its own as ``settings`` say."""
    if settings.translate:
        images = random_translate(images, settings.translate, generator)
    if settings.flip:
        images = random_flip(images, generator)
    if settings.erase:
        images = random_erase(images, settings.erase, generator)
    return images


def random_translate(images: Tensor, pixels: int, generator: torch.Generator | None) -> Tensor:
    """Shift each ``[C, H, W]`` image by its own random offset in ``[-pixels, pixels]``, zero-filled."""
    n, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pixels, pixels, pixels, pixels))
    offsets = torch.randint(0, 2 * pixels + 1, (2, n, 1), generator=generator).to(images.device)
    arange = lambda count: torch.arange(count, device=images.device)  # noqa: E731
    rows = (offsets[0] + arange(height))[:, None, :, None]  # [n, 1, H, 1]
    cols = (offsets[1] + arange(width))[:, None, None, :]  # [n, 1, 1, W]
    return padded[arange(n)[:, None, None, None], arange(channels)[None, :, None, None], rows, cols]


def random_flip(images: Tensor, generator: torch.Generator | None) -> Tensor:
    """Each image mirrored left to right with probability one half."""
    flipped = torch.rand(len(images), generator=generator).to(images.device) < 0.5
    return torch.where(flipped[:, None, None, None], images.flip(-1), images)


def random_erase(images: Tensor, probability: float, generator: torch.Generator | None) -> Tensor:
    """With ``probability``, one rectangle of each image set to zero, its area and aspect ratio
    drawn as ``ERASE_AREA`` and ``ERASE_ASPECT`` say, its place uniform within the image."""
    n, _, height, width = images.shape
    draws = torch.rand(5, n, generator=generator)
    area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * draws[0])
    aspect = torch.exp(math.log(ERASE_ASPECT[0]) + math.log(ERASE_ASPECT[1] / ERASE_ASPECT[0]) * draws[1])
    h = (area * aspect).sqrt().round().clamp(1, height)
    w = (area / aspect).sqrt().round().clamp(1, width)
    top = ((height - h + 1) * draws[2]).floor()
    left = ((width - w + 1) * draws[3]).floor()
    erased = draws[4] < probability
    rows, cols = torch.arange(height), torch.arange(width)
    inside = (
        erased[:, None, None]
        & ((rows[None, :] >= top[:, None]) & (rows[None, :] < (top + h)[:, None]))[:, :, None]
        & ((cols[None, :] >= left[:, None]) & (cols[None, :] < (left + w)[:, None]))[:, None, :]
    )  # [n, H, W]
    return images.masked_fill(inside[:, None].to(images.device), 0)
