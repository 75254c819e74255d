"""Chunks of mini-batches per Lightning step, the optimiser stepped once per mini-batch inside.

Each Lightning training step costs about a millisecond of hooks and bookkeeping, as much as a
small tabular net's whole step. ``chunked(cls)`` makes a LightningModule class that receives a
chunk ``[S, M, B, ...]`` of S consecutive mini-batches per step (``train_loader(chunked=True)``)
and runs the class's own ``training_step`` on each, through Lightning's manual optimisation, then
the schedule, after each mini-batch: the same updates as S automatic steps.

Each mini-batch's backward and step go through Lightning (``self.manual_backward`` and the
optimiser ``self.optimizers()`` hands out) wherever anything can watch them: under a precision
other than 32-bit, whose plugin autocasts, scales and unscales them, and whenever the caller says
(``step_hooks``; the engine does for a preset with a ``trainer``, ``callbacks`` or ``loggers``
section). Lightning then calls ``on_before_backward``, ``on_after_backward`` and
``on_before_optimizer_step`` for each and counts it in ``global_step``; the module's
``configure_gradient_clipping`` runs from ``on_before_optimizer_step``, once the gradients are
unscaled, as in automatic optimisation. Where nothing watches, the loss's own ``backward()`` and
the optimiser's own ``step()`` give the same numbers (tests/test_engine.py) without the hooks'
80-odd microseconds a mini-batch, a fifth of a small table's fit (docs/speed.md).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import TypeVar, cast

import lightning as L
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

Module = TypeVar("Module", bound=L.LightningModule)


class ChunkedSteps(L.LightningModule):
    """Mixed in before a LightningModule class whose ``training_step`` returns the loss.
    ``step_hooks``: whether each mini-batch goes through Lightning's hooks even in 32-bit
    precision (the module docstring says when it must)."""

    def __init__(self, *args, step_hooks: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False
        self.step_hooks = step_hooks

    def optimizer_steps(self) -> int:
        """Optimiser steps in the whole fit: one per mini-batch, not one per chunk. The Trainer's
        ``estimated_stepping_batches`` sets its loaders up, and its loader says how many."""
        _ = self.trainer.estimated_stepping_batches
        loader = self.trainer.train_dataloader
        assert loader is not None and self.trainer.max_epochs is not None, "set up by estimated_stepping_batches"
        return self.trainer.max_epochs * loader.steps_per_epoch

    def training_step(self, chunk: dict, batch_idx: int) -> None:
        # one optimiser and at most one schedule: FoldModule.configure_optimizers
        scheduler = cast(LRScheduler | None, self.lr_schedulers())
        through_lightning = self.step_hooks or self.trainer.precision != "32-true"
        optimizer = cast(Optimizer, self.optimizers(use_pl_optimizer=through_lightning))
        for batch in mini_batches(chunk):
            loss = cast(Tensor, super().training_step(batch, batch_idx))
            optimizer.zero_grad(set_to_none=True)
            if through_lightning:  # LightningOptimizer.step calls on_before_optimizer_step, which clips
                self.manual_backward(loss)
            else:
                loss.backward()
                self.configure_gradient_clipping(optimizer)
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
