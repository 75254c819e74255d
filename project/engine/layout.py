"""Stacked or one after another: how a model's folds train.

The two give the same scores but not the same last bits (a batched matmul or a grouped
convolution sums in another order than the members' own), so the choice is made by a rule, the
same on every machine of a device type, and not by a stopwatch, unless the user asks
(``benchmark: true``, as ``torch.backends.cudnn.benchmark``):

- a hand-stacked form (the MLP) is stacked, and one member is its own stack;
- a module that keeps running statistics (BatchNorm), or that ``torch.func.vmap`` refuses (a
  probe of one step says), trains one member after another;
- convolutions train one member after another on a CPU, where vmap turns them into grouped
  convolutions that took longer than the members alone (docs/speed.md), and stacked elsewhere;
- anything else is stacked.

The hand-stacked MLP's first layer on sparse rows (one-hot tables) follows a rule too
(``choose_first_layer``).

With ``benchmark`` the first fit times a few training steps of the M-member stack against M
single-member steps, on inputs of the fit's shape and on its device, and every later fit of the
same model, arguments, shape, batch size, device and setting in this process reuses the answer;
the layout says what was measured, and the runs record it.
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
    reason: str  # why: "hand-stacked", "one member", "asked for", the rule, or what was measured

    def describe(self, kind: str) -> str:
        """e.g. ``stacked (hand-stacked MLP)``, ``sequential (torch.func vmap; measured on cpu: ...)``."""
        how = "stacked" if self.stacked else "sequential"
        return f"{how} ({kind})" if self.reason in ("hand-stacked", "one member") else f"{how} ({kind}; {self.reason})"


_MEASURED: dict[tuple, Layout] = {}


def _training_step(stack: nn.Module) -> Callable[[torch.Tensor], None]:
    """One step of the project's optimiser on ``stack``, as a fit takes it."""
    optimizer = create_optimizer("adamw", [{"params": list(stack.parameters()), "weight_decay": 0.0}], lr=1e-4)
    stack.train()

    def step(x: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        stack(x).float().square().mean().backward()
        optimizer.step()

    return step


def _seconds_per_step(stack: nn.Module, x: torch.Tensor, steps: int = 3) -> float:
    step = _training_step(stack)
    return best_seconds(lambda: step(x), x.device, steps)


def choose_layout(
    make_modules: Callable[[int], Sequence[nn.Module]],
    name: str,
    key: tuple,
    sample_shape: tuple[int, ...],
    batch_size: int,
    members: int,
    device: torch.device,
    benchmark: bool = False,
) -> Layout:
    """How to train ``members`` copies of the modules ``make_modules(n)`` builds, by the rule above
    (``benchmark``: by timing); ``key`` names the model and its arguments for the cache."""
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
        benchmark,
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if cache_key not in _MEASURED:
        _MEASURED[cache_key] = _layout(make_modules, probe, name, sample_shape, batch_size, members, device, benchmark)
        log.info("folds of %s: %s", name, _MEASURED[cache_key].describe("torch.func vmap"))
    return _MEASURED[cache_key]


def _layout(
    make_modules: Callable[[int], Sequence[nn.Module]],
    module: nn.Module,
    name: str,
    sample_shape: tuple[int, ...],
    batch_size: int,
    members: int,
    device: torch.device,
    benchmark: bool,
) -> Layout:
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):  # the probe's dropout draws leave the fit's stream as it was
        try:
            step = _training_step(build_stack(make_modules(2), name).to(device))
            step(torch.randn(2, 2, *sample_shape, device=device))
        except RuntimeError as err:  # an operation torch.func.vmap has no batching rule for
            return Layout(False, f"torch.func.vmap refused it: {str(err).splitlines()[0]}")
        if benchmark:
            x = torch.randn(members, batch_size, *sample_shape, device=device)
            stacked = _seconds_per_step(build_stack(make_modules(members), name).to(device), x)
            alone = _seconds_per_step(build_stack(make_modules(1), name).to(device), x[:1])
            return Layout(
                stacked <= members * alone,
                f"benchmark: measured on {device.type}: {stacked * 1e3:.0f} ms per step stacked, "
                f"{members * alone * 1e3:.0f} ms one after another",
            )
    conv = convolution(module)
    if conv is not None and device.type == "cpu":
        return Layout(False, f"{conv[0]} at {conv[1]!r} on a CPU, where stacked convolutions are slower")
    return Layout(True, "stacked by default")


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def convolution(module: nn.Module) -> tuple[str, str] | None:
    """The first convolution of ``module`` (its class and path), if it has one."""
    for path, sub in module.named_modules():
        if isinstance(sub, CONVOLUTIONS):
            return type(sub).__name__, path
    return None


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


def choose_first_layer(stack: nn.Module, batch, key: tuple, benchmark: bool = False) -> FirstLayer:
    """Whether ``stack`` (a member stack that ``accepts_nonzero``) runs on ``batch``'s nonzero entries
    (a ``SparseRows``: one ``embedding_bag`` over the first layer's weight rows) or on its dense rows
    (one batched matmul). The two sum in another order, so by a rule: on nonzero entries on a CPU,
    where the sum of a few weight rows per sample beat the matmul (docs/speed.md), dense elsewhere.
    With ``benchmark``, forward and backward passes of each on the fit's device decide instead, with
    the random generators left as they were, measured once per ``key`` (the model and its
    arguments), batch shape, device and setting."""
    device = batch.dense.device
    if not benchmark:
        on_cpu = device.type == "cpu"
        return FirstLayer(on_cpu, "on a CPU" if on_cpu else f"on {device.type}, where it was not measured")
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
            f"benchmark: measured on {device.type}: {sparse * 1e3:.2f} ms a pass on nonzero entries, "
            f"{dense * 1e3:.2f} ms dense",
        )
        log.info("first layer of %s: %s", key[0], _FIRST_LAYER[cache_key].describe())
    return _FIRST_LAYER[cache_key]
