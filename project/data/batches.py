"""In-memory batches for fold-stacked training.

Every tensor the model sees has a leading *member* dimension: member ``m`` is one fold's model
(or the single model when only one is trained). Each member has its own rows, its own fitted
preprocessing and its own shuffling, so training K members at once is K independent fits.
Batches are cut from index permutations; nothing is collated sample by sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor

from project.config import Augment
from project.data.augment import augmented
from project.utils.seeds import derive_seed

DENSE_LIMIT_BYTES = 2 * 1024**3
# rows at most this dense also travel as their nonzero entries (see MemberFeatures.nonzero)
SPARSE_DENSITY = 0.5


class SparseRows(NamedTuple):
    """Table rows ``dense`` ``[..., M, B, F]`` with their nonzero entries: ``columns`` and
    ``value`` ``[..., M, B, K]``, padded with (column 0, value 0). The input of a member stack
    that can use them (``accepts_nonzero``: the hand-stacked MLP's first layer sums K weight rows
    per sample instead of multiplying all F columns)."""

    dense: Tensor
    columns: Tensor
    value: Tensor


class MemberFeatures:
    """Features per member: a ``[M, N, F]`` tensor, or a shared ``[N, ...]`` tensor plus a per-member
    affine normalisation ``(x - shift[m]) / scale[m]`` applied when a batch is cut. Batches hold
    samples of ``sample_shape`` (``(F,)`` for table rows, ``(C, H, W)`` for images)."""

    def __init__(
        self,
        x: Tensor,
        shift: Tensor | None = None,
        scale: Tensor | None = None,
        sample_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.x, self.shift, self.scale = x, shift, scale
        self.shared = shift is not None
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (x.shape[-1],)
        self._dense: MemberFeatures | None = None
        self._copies: dict[torch.device, MemberFeatures] = {}

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device) -> MemberFeatures:
        """These features on ``device`` (itself where they are there already), copied once: a
        fold's features live where its model trains, and each step indexes them there."""
        device = torch.device(device)
        if device == self.device or (device.type == self.device.type and device.index is None):
            return self
        if device not in self._copies:

            def move(t):
                return None if t is None else t.to(device)

            self._copies[device] = MemberFeatures(move(self.x), move(self.shift), move(self.scale), self.sample_shape)
        return self._copies[device]

    @property
    def n_members(self) -> int:
        return self.shift.shape[0] if self.shift is not None else self.x.shape[0]

    @property
    def n_features(self) -> int:
        return int(math.prod(self.x.shape[1:])) if self.shared else self.x.shape[-1]

    def gather(self, rows: Tensor, augment: Augment | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``rows`` is ``[..., M, B]``; returns float features ``[..., M, B, *sample_shape]``. Images
        can be augmented, each on its own, with draws from ``generator`` (project/data/augment.py)."""
        return self._gather_flat(rows, augment, generator).view(*rows.shape, *self.sample_shape)

    def _gather_flat(self, rows: Tensor, augment: Augment | None, generator: torch.Generator | None) -> Tensor:
        shift, scale = self.shift, self.scale
        if shift is None or scale is None:
            return member_rows(self.x, rows)
        augment = augment if augment and len(self.sample_shape) == 3 else None  # images only
        dense = None if augment else self._normalised()
        if dense is not None:
            return dense._gather_flat(rows, augment, None)
        x = self.x[rows]
        if augment:
            x = augmented(x.reshape(-1, *self.sample_shape), augment, generator)
        x = x.reshape(*rows.shape, -1).float()
        return (x - shift[:, None, None]) / scale[:, None, None]

    def gather_nonzero(self, rows: Tensor) -> tuple[Tensor, Tensor] | None:
        """The nonzero entries of the rows ``gather`` returns, as column indices and values
        ``[..., M, B, K]``; None where the features are not sparse (see ``nonzero``)."""
        if self.nonzero is None:
            return None
        index, value = self.nonzero
        return member_rows(index, rows), member_rows(value, rows)

    @cached_property
    def nonzero(self) -> tuple[Tensor, Tensor] | None:
        """Each row's nonzero entries, ``[M, N, K]`` int32 column indices and their values, padded with
        (column 0, value 0) to the largest count K; computed once. One-hot encoded tables are mostly
        zeros, and a first layer that sums K weight rows per sample does a fraction of the work of
        a matmul over all F columns. None for images and for rows more than SPARSE_DENSITY nonzero."""
        if self.shared or not self.x.numel():
            return None
        zero = self.x == 0
        width = int((~zero).sum(dim=-1).max())
        if width > SPARSE_DENSITY * self.x.shape[-1]:
            return None
        # a stable sort of the zero flags puts each row's nonzero columns first, in order
        columns = torch.sort(zero.to(torch.uint8), dim=-1, stable=True).indices[..., : max(width, 1)]
        return columns.to(torch.int32), self.x.gather(-1, columns)

    def _normalised(self) -> MemberFeatures | None:
        """The normalised float features of every member, computed once when they fit in
        ``DENSE_LIMIT_BYTES``: cutting batches is then a row copy instead of a conversion per epoch."""
        shift, scale = self.shift, self.scale
        if shift is None or scale is None:
            return None
        if self._dense is None and self.n_members * self.x.numel() * 4 <= DENSE_LIMIT_BYTES:
            flat = self.x.reshape(self.x.shape[0], -1).float()
            normalised = torch.stack([(flat - s) / c for s, c in zip(shift, scale)])
            self._dense = MemberFeatures(normalised)
        return self._dense

    @property
    def n_rows(self) -> int:
        return self.x.shape[0] if self.shared else self.x.shape[1]

    def select(self, members: Sequence[int]) -> MemberFeatures:
        if self.shift is not None and self.scale is not None:
            return MemberFeatures(self.x, self.shift[list(members)], self.scale[list(members)], self.sample_shape)
        return MemberFeatures(self.x[list(members)], sample_shape=self.sample_shape)


def member_rows(table: Tensor, rows: Tensor) -> Tensor:
    """``table[m, rows[..., m, b]]`` for a ``[M, N, C]`` table and ``[..., M, B]`` rows: one index_select
    over the ``[M * N, C]`` rows, a plain row copy, faster than broadcast indexing."""
    members, n_rows = table.shape[0], table.shape[1]
    flat = rows + n_rows * torch.arange(members, device=rows.device)[:, None]
    return table.view(members * n_rows, -1).index_select(0, flat.reshape(-1)).view(*rows.shape, -1)


class StackedBatches:
    """An iterable of ``{"x": [M, B, ...], "y": [M, B], "w": [M, B], "rows": [M]}`` batches (``rows``:
    each member's real rows, the sum of its weights), or with ``chunk_steps`` of chunks
    ``{"x": [S, M, B, ...], ...}`` holding S consecutive mini-batches, so that a training loop pays
    its per-item overhead once per chunk. With ``nonzero`` (and sparse features) ``"x"`` is a
    ``SparseRows``.

    ``rows[m]`` are the row indices member ``m`` trains or is scored on. Members with fewer rows
    than the largest get padding rows of weight 0 in the last batch, which the losses and metrics
    ignore. With ``shuffle``, member ``m`` draws its permutations from its own generator, seeded by
    ``seed`` and ``seed_ids[m]``, so a member sees the same batches alone or stacked with others.
    """

    def __init__(
        self,
        features: MemberFeatures,
        targets: Tensor | None,
        rows: Sequence[Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        seed_ids: Sequence[int] | None = None,
        chunk_steps: int | None = None,
        augment: Augment | None = None,
        nonzero: bool = False,
        device: torch.device | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        # ``device``: where the batches are cut (the features and targets copied there once)
        self.device = torch.device(device) if device is not None else features.device
        features = features.to(self.device)
        targets = targets.to(self.device) if targets is not None else None
        self.features, self.targets, self.rows = features, targets, [r.long() for r in rows]
        self.batch_size, self.shuffle, self.chunk_steps, self.augment = batch_size, shuffle, chunk_steps, augment
        self.nonzero = nonzero and features.nonzero is not None
        self.augment_generator = torch.Generator().manual_seed(derive_seed(seed, "augment"))
        self.n_rows = max((len(r) for r in self.rows), default=0)
        seed_ids = list(range(len(rows))) if seed_ids is None else list(seed_ids)
        self.generators = [torch.Generator().manual_seed(derive_seed(seed, "batches", i)) for i in seed_ids]
        self._cache: list[dict] | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Mini-batches (optimiser steps) per pass over the rows."""
        return math.ceil(self.n_rows / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self.steps_per_epoch / (self.chunk_steps or 1))

    def _order(self, length: int) -> tuple[Tensor, Tensor]:
        index = torch.zeros(len(self.rows), length, dtype=torch.long)
        weight = torch.zeros(len(self.rows), length)
        for m, (rows, generator) in enumerate(zip(self.rows, self.generators)):
            if self.shuffle:
                rows = rows[torch.randperm(len(rows), generator=generator)]
            index[m, : len(rows)] = rows
            weight[m, : len(rows)] = 1.0
        return index, weight

    def _batch(self, rows: Tensor, weight: Tensor) -> dict:
        rows, weight = rows.to(self.device, non_blocking=True), weight.to(self.device, non_blocking=True)
        dense = self.features.gather(rows, self.augment, self.augment_generator)
        nonzero = self.features.gather_nonzero(rows) if self.nonzero else None
        x = dense if nonzero is None else SparseRows(dense, *nonzero)
        batch = {"x": x, "w": weight, "rows": weight.sum(dim=-1)}
        if self.targets is not None:
            batch["y"] = self.targets[rows]
        return batch

    def __iter__(self) -> Iterator[dict]:
        if self.shuffle or self.augment:
            yield from self._batches()
            return
        # evaluation batches are the same every epoch: cut them once
        if self._cache is None:
            self._cache = list(self._batches())
        yield from self._cache

    def _batches(self) -> Iterator[dict]:
        if self.chunk_steps is None:
            index, weight = self._order(self.n_rows)
            for start in range(0, self.n_rows, self.batch_size):
                stop = start + self.batch_size
                yield self._batch(index[:, start:stop], weight[:, start:stop])
            return
        # pad to whole mini-batches (padding rows weigh 0), then lay out as [steps, M, B]
        steps, members = self.steps_per_epoch, len(self.rows)
        index, weight = self._order(steps * self.batch_size)
        index = index.view(members, steps, self.batch_size).transpose(0, 1).contiguous()
        weight = weight.view(members, steps, self.batch_size).transpose(0, 1).contiguous()
        for start in range(0, steps, self.chunk_steps):
            stop = start + self.chunk_steps
            yield self._batch(index[start:stop], weight[start:stop])
