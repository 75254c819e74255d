"""torchmetrics that keep one score per stacked member and ignore padding rows (weight 0).

Inputs are ``[M, B]`` predictions (regression) or ``[M, B, C]`` logits (classification), targets
``[M, B]`` and 0/1 row weights ``[M, B]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from project.utils.devices import training_device


def accumulator_dtype() -> torch.dtype:
    """float64, in which the scores of many rows sum exactly enough; float32 where the fit trains on
    Apple's MPS, which has no float64."""
    return torch.float32 if training_device().type == "mps" else torch.float64


class _WeightedMean(Metric):
    """The weighted mean of a per-row quantity, per member; subclasses say what the quantity is."""

    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, n_members: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.accumulate = accumulator_dtype()
        self.add_state("total", default=torch.zeros(n_members, dtype=self.accumulate), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(n_members, dtype=self.accumulate), dist_reduce_fx="sum")

    def per_row(self, preds: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, preds: Tensor, target: Tensor, weight: Tensor) -> None:
        self.total += (self.per_row(preds, target).to(self.accumulate) * weight).sum(dim=1)
        self.count += weight.sum(dim=1).to(self.accumulate)

    def compute(self) -> Tensor:
        return self.total / self.count


class StackedRMSE(_WeightedMean):
    """Root mean squared error per member, on the scale the model learns, or (``inverse``) on the
    original scale of a transformed target."""

    higher_is_better = False

    def __init__(self, n_members: int, inverse: Callable[[Tensor], Tensor] | None = None, **kwargs) -> None:
        super().__init__(n_members, **kwargs)
        self.inverse = inverse

    def per_row(self, preds: Tensor, target: Tensor) -> Tensor:
        if self.inverse is not None:
            preds, target = self.inverse(preds.to(self.accumulate)), self.inverse(target.to(self.accumulate))
        return (preds - target).square()

    def compute(self) -> Tensor:
        return super().compute().sqrt()


class StackedMAE(StackedRMSE):
    def per_row(self, preds: Tensor, target: Tensor) -> Tensor:
        return super().per_row(preds, target).sqrt()

    def compute(self) -> Tensor:
        return _WeightedMean.compute(self)


class StackedAccuracy(_WeightedMean):
    higher_is_better = True

    def per_row(self, logits: Tensor, target: Tensor) -> Tensor:
        return (logits.argmax(dim=-1) == target).to(self.accumulate)


class StackedLogLoss(_WeightedMean):
    """Cross-entropy of the predicted class probabilities (no label smoothing)."""

    higher_is_better = False

    def per_row(self, logits: Tensor, target: Tensor) -> Tensor:
        return -torch.log_softmax(logits.to(self.accumulate), dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


class StackedAUROC(Metric):
    """Area under the ROC curve of a two-class task, per member (scores: class 1's probability)."""

    full_state_update = False
    scores: list[Tensor]
    targets: list[Tensor]
    weights: list[Tensor]
    higher_is_better = True

    def __init__(self, n_members: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.n_members = n_members
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("weights", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor, weight: Tensor) -> None:
        if logits.shape[-1] != 2:
            raise ValueError(f"auc is for two classes, got logits for {logits.shape[-1]}")
        self.scores.append(logits.softmax(dim=-1)[..., 1].detach())
        self.targets.append(target)
        self.weights.append(weight)

    def compute(self) -> Tensor:
        from torchmetrics.functional.classification import binary_auroc

        scores, targets, weights = (torch.cat(s, dim=1) for s in (self.scores, self.targets, self.weights))
        return torch.stack(
            [binary_auroc(scores[m][weights[m] > 0], targets[m][weights[m] > 0]) for m in range(self.n_members)]
        ).to(accumulator_dtype())


class MemberMean(Metric):
    """Weighted mean per member of per-member values ``[M]`` (the training loss of each batch,
    weighted by its rows)."""

    full_state_update = False
    total: Tensor
    weight: Tensor

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
