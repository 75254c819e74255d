"""Stacked or one after another: how a model's folds train faster here, measured once.

vmap turns a stack of small convolutions into grouped ones, which on a CPU can take longer than
the members one after another, while a stack of linear layers is one batched matmul and wins.
So for a model without a hand-stacked implementation the first fit times a few training steps
of the M-member stack against M single-member steps, on inputs of the fit's shape and on its
device, with the project's optimiser and the fit's deterministic setting, and every later fit of
the same model, arguments, shape, batch size, device and setting in this process reuses the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from project.engine.optim import create_optimizer
from project.engine.stacking import build_stack, hand_stacked_form, running_statistics
from project.engine.timing import best_seconds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    stacked: bool
    reason: str  # why: "hand-stacked", "one member", "asked for" or what was measured

    def describe(self, kind: str) -> str:
        """e.g. ``stacked (hand-stacked MLP)``, ``sequential (torch.func vmap; measured on cpu: ...)``."""
        how = "stacked" if self.stacked else "sequential"
        return f"{how} ({kind})" if self.reason in ("hand-stacked", "one member") else f"{how} ({kind}; {self.reason})"


_MEASURED: dict[tuple, Layout] = {}


def _seconds_per_step(stack: nn.Module, x: torch.Tensor, steps: int = 3) -> float:
    optimizer = create_optimizer("adamw", [{"params": list(stack.parameters()), "weight_decay": 0.0}], lr=1e-4)
    stack.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        stack(x).float().square().mean().backward()
        optimizer.step()

    return best_seconds(step, x.device, steps)


def choose_layout(
    make_modules: Callable[[int], Sequence[nn.Module]],
    name: str,
    key: tuple,
    sample_shape: tuple[int, ...],
    batch_size: int,
    members: int,
    device: torch.device,
) -> Layout:
    """How to train ``members`` copies of the modules ``make_modules(n)`` builds; ``key`` names the
    model and its arguments for the cache. A module that cannot be stacked trains one member after
    another, and the layout says why."""
    if members == 1:
        return Layout(True, "one member")
    probe = make_modules(1)[0]
    if hand_stacked_form(probe) is not None:
        return Layout(True, "hand-stacked")
    found = running_statistics(probe)
    if found is not None:
        return Layout(False, f"{found[0]} at {found[1]!r} keeps running statistics, which stacking cannot batch")
    cache_key = (
        key,
        tuple(sample_shape),
        batch_size,
        members,
        device.type,
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if cache_key not in _MEASURED:
        x = torch.randn(members, batch_size, *sample_shape, device=device)
        try:
            stacked = _seconds_per_step(build_stack(make_modules(members), name).to(device), x)
        except RuntimeError as err:  # an operation torch.func.vmap has no batching rule for
            layout = Layout(False, f"torch.func.vmap refused it: {str(err).splitlines()[0]}")
        else:
            alone = _seconds_per_step(build_stack(make_modules(1), name).to(device), x[:1])
            layout = Layout(
                stacked <= members * alone,
                f"measured on {device.type}: {stacked * 1e3:.0f} ms per step stacked, "
                f"{members * alone * 1e3:.0f} ms one after another",
            )
        log.info("folds of %s: %s", name, layout.describe("torch.func vmap"))
        _MEASURED[cache_key] = layout
    return _MEASURED[cache_key]


@dataclass(frozen=True)
class FirstLayer:
    """Whether the hand-stacked MLP's first layer runs on the rows' nonzero entries, and why."""

    nonzero: bool
    reason: str

    def describe(self) -> str:
        return f"first layer {'on nonzero entries' if self.nonzero else 'dense'}, {self.reason}"


_FIRST_LAYER: dict[tuple, FirstLayer] = {}


def _seconds_per_pass(stack: nn.Module, x, passes: int = 5) -> float:
    def one_pass() -> None:
        stack.zero_grad(set_to_none=True)
        stack(x).float().square().mean().backward()

    seconds = best_seconds(one_pass, getattr(x, "dense", x).device, passes)  # x: a SparseRows, or a tensor
    stack.zero_grad(set_to_none=True)
    return seconds


def choose_first_layer(stack: nn.Module, batch, key: tuple) -> FirstLayer:
    """Whether ``stack`` (a member stack that ``accepts_nonzero``) runs faster on ``batch``'s nonzero
    entries (a ``SparseRows``: one ``embedding_bag`` over the first layer's weight rows) than on its
    dense rows (one batched matmul): forward and backward passes of each on the fit's device, with
    the random generators left as they were, measured once per ``key`` (the model and its
    arguments), batch shape, device and setting. Which wins depends on the device: the sum of a
    few weight rows per sample beats the matmul on a CPU's cores, not always on a GPU."""
    device = batch.dense.device
    cache_key = (
        key,
        tuple(batch.dense.shape),
        tuple(batch.columns.shape),
        device.type,
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
    )
    if cache_key not in _FIRST_LAYER:
        cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            sparse = _seconds_per_pass(stack, batch)
            dense = _seconds_per_pass(stack, batch.dense)
        _FIRST_LAYER[cache_key] = FirstLayer(
            sparse <= dense,
            f"measured on {device.type}: {sparse * 1e3:.2f} ms a pass on nonzero entries, {dense * 1e3:.2f} ms dense",
        )
        log.info("first layer of %s: %s", key[0], _FIRST_LAYER[cache_key].describe())
    return _FIRST_LAYER[cache_key]
