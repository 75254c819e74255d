"""torchmetrics that keep one score per stacked member and ignore padding rows (weight 0)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class StackedRMSE(Metric):
    """Root mean squared error per member; inputs ``[M, B]``."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, n_members: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("sum_sq", default=torch.zeros(n_members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n_members, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, weight: Tensor) -> None:
        self.sum_sq += ((preds - target).double().square() * weight).sum(dim=1)
        self.count += weight.sum(dim=1).double()

    def compute(self) -> Tensor:
        return (self.sum_sq / self.count).sqrt()


class StackedAccuracy(Metric):
    """Classification accuracy per member; logits ``[M, B, C]``, targets ``[M, B]``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, n_members: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.zeros(n_members, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n_members, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, weight: Tensor) -> None:
        self.correct += ((logits.argmax(dim=-1) == target).double() * weight).sum(dim=1)
        self.count += weight.sum(dim=1).double()

    def compute(self) -> Tensor:
        return self.correct / self.count


class MemberMean(Metric):
    """Weighted mean per member of per-member values ``[M]`` (the training loss of each batch,
    weighted by its rows)."""

    full_state_update = False

    def __init__(self, n_members: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(n_members), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.zeros(n_members), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: Tensor) -> None:
        # called once per mini-batch: two in-place ops, no conversion (an epoch sums a few hundred
        # values at most, which float32 holds well), no assignment through nn.Module.__setattr__
        self.total.addcmul_(value, weight)
        self.weight.add_(weight)

    def compute(self) -> Tensor:
        return self.total / self.weight.clamp(min=1)
