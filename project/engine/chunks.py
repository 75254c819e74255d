"""Chunks of mini-batches per Lightning step, the optimiser stepped once per mini-batch inside.

Each Lightning training step costs about a millisecond of hooks and bookkeeping, as much as a
small tabular net's whole step. ``chunked(cls)`` makes a LightningModule class that receives a
chunk ``[S, M, B, ...]`` of S consecutive mini-batches per step (``train_loader(chunked=True)``)
and runs the class's own ``training_step`` on each, through Lightning's manual optimisation:
``self.manual_backward`` and the optimiser ``self.optimizers()`` hands out, then the schedule,
after each mini-batch: the same updates as S automatic steps, under any precision (the Trainer's
precision plugin scales and unscales the loss, and autocasts the step). The module's
``configure_gradient_clipping`` runs from ``on_before_optimizer_step``, where Lightning calls it
once the gradients are unscaled, as in automatic optimisation.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TypeVar, cast

import lightning as L
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

Module = TypeVar("Module", bound=L.LightningModule)


class ChunkedSteps(L.LightningModule):
    """Mixed in before a LightningModule class whose ``training_step`` returns the loss."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False

    def optimizer_steps(self) -> int:
        """Optimiser steps in the whole fit: one per mini-batch, not one per chunk. The Trainer's
        ``estimated_stepping_batches`` sets its loaders up, and its loader says how many."""
        _ = self.trainer.estimated_stepping_batches
        loader = self.trainer.train_dataloader
        assert loader is not None and self.trainer.max_epochs is not None, "set up by estimated_stepping_batches"
        return self.trainer.max_epochs * loader.steps_per_epoch

    def training_step(self, chunk: dict, batch_idx: int) -> None:
        # one optimiser and at most one schedule: FoldModule.configure_optimizers
        optimizer = cast(LightningOptimizer, self.optimizers())
        scheduler = cast(LRScheduler | None, self.lr_schedulers())
        for batch in mini_batches(chunk):
            loss = cast(Tensor, super().training_step(batch, batch_idx))
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        self.configure_gradient_clipping(optimizer)
        super().on_before_optimizer_step(optimizer)


def mini_batches(chunk: dict) -> Iterator[dict]:
    """The chunk's mini-batches, each cut to the rows some member still has: padding rows (weight
    0) fill the end of a member's epoch, so its last mini-batch is mostly padding (one host sync
    per chunk)."""
    weight = chunk["w"]
    widths = (weight != 0).sum(dim=-1).amax(dim=-1).tolist()
    for step, width in enumerate(widths):
        yield {key: _cut(part, step, width, weight.shape[-1]) for key, part in chunk.items()}


def _cut(part: Tensor | tuple, step: int, width: int, full: int) -> Tensor | tuple:
    if isinstance(part, tuple):  # SparseRows
        return type(part)(*(_cut(p, step, width, full) for p in part))
    return part[step] if width == full or part.dim() == 2 else part[step, :, :width]  # [S, M] entries: per member


@functools.cache
def chunked(cls: type[Module]) -> type[Module]:
    """``cls`` training on chunks of mini-batches (one class per ``cls``)."""
    return type(f"Chunked{cls.__name__}", (ChunkedSteps, cls), {"__module__": cls.__module__})
