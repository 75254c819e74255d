"""Optimisers and learning-rate schedules by name, on torch's fused kernels.

AdamW runs without the bookkeeping torch redoes on every step. A fold-stacked model has a handful
of large parameter tensors and short steps. Before each call of its fused kernel,
``torch.optim.AdamW`` re-collects every group's parameters, gradients and state into lists, checks
them and regroups them by device, a noticeable part of a short step (docs/speed.md). ``FusedAdamW``
keeps those lists from one step to the next and calls the same kernel: the same update bit for bit
(tests/test_engine.py), the same state and ``state_dict``, so checkpoints, learning-rate schedulers
and step hooks work as with torch's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from project.config.schema import OPTIMIZERS, SCHEDULERS

# one bucket per (param group, device, dtype): the kernel takes tensors of one device and dtype
Bucket = tuple[dict, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


class FusedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` (no AMSGrad, no maximize), with each group's tensor lists
    kept between steps. Parameters without a gradient are skipped, as torch skips them."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        self._buckets: list[Bucket] | None = None
        unscaled_by_the_scaler(self)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._buckets = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._buckets = None  # the state tensors were replaced

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            super().zero_grad(set_to_none=False)
            return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets = self._buckets
        if buckets is None or any(p.grad is None for _, params, *_ in buckets for p in params):
            buckets = self._collect()
        torch._foreach_add_([step for *_, steps in buckets for step in steps], 1)
        for group, params, exp_avgs, exp_avg_sqs, steps in buckets:
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                params,
                [p.grad for p in params],
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
        return loss

    def _collect(self) -> list[Bucket]:
        """The parameters that have a gradient, with their state (created as torch creates it),
        bucketed; kept for the next steps when every parameter had a gradient."""
        buckets: dict[tuple[int, torch.device, torch.dtype], Bucket] = {}
        complete = True
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    complete = False
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = buckets.setdefault((index, p.device, p.dtype), (group, [], [], [], []))
                for items, value in zip(bucket[1:], (p, state["exp_avg"], state["exp_avg_sq"], state["step"])):
                    items.append(value)
        self._buckets = list(buckets.values()) if complete else None
        return list(buckets.values())


def unscaled_by_the_scaler(optimizer: torch.optim.Optimizer) -> None:
    """Under a ``GradScaler`` (16-bit mixed precision), the scaler unscales the gradients (before
    Lightning clips them) and skips a step whose gradients are not finite, as it does for any
    optimiser. A fused optimiser tells the scaler it does both inside its kernel
    (``_step_supports_amp_scaling``, torch's own protocol between the two), which ``FusedAdamW``'s
    step does not, and Lightning then clips gradients still scaled; torch 2.13's fused SGD on the
    CPU also took a step of about 1e29 after a skipped one. So the scaler is told to do it."""
    optimizer._step_supports_amp_scaling = False  # type: ignore[attr-defined]  # the one private use, see above


def _sgd(groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    unscaled_by_the_scaler(optimizer)
    return optimizer


def _adamw(groups: list[dict], lr: float, momentum: float) -> torch.optim.Optimizer:
    return FusedAdamW(groups, lr=lr)


# fused kernels (CPU and CUDA): on a small model, torch's per-tensor loops cost more than the update
BUILDERS = {"adamw": _adamw, "sgd": _sgd}
assert set(BUILDERS) == set(OPTIMIZERS), "project.config.schema.OPTIMIZERS names the builders here"


def create_optimizer(name: str, groups: list[dict], lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """An optimiser by name over parameter groups that carry their own weight decay."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer {name!r} is unknown: expected one of {', '.join(OPTIMIZERS)}")
    return BUILDERS[name](groups, lr, momentum)


def create_scheduler(
    name: str, optimizer: torch.optim.Optimizer, lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A learning-rate schedule by name, stepped once per optimiser step; None for ``"none"``."""
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler {name!r} is unknown: expected one of {', '.join(SCHEDULERS)}")
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    return None
