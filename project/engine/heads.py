"""What turns a member stack's outputs into predictions, a loss and a metric, per kind of task.

A head works on ``[M, B, ...]`` outputs with per-row weights ``w`` ``[M, B]`` (1 for a member's
rows, 0 for the padding that evens out members of different sizes) and each member's count of
rows ``[M]``; its loss is one value per member, the mean over that member's own rows, so each
member's gradient is its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from project.engine.metrics import StackedAccuracy, StackedAUROC, StackedLogLoss, StackedMAE, StackedRMSE


def member_mean(per_row: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
    """The mean over each member's own rows, ``[M]``."""
    return (per_row * weight).sum(dim=1) / rows.clamp(min=1)


def head_outputs(net: nn.Module, head: nn.Module, x: Tensor, tta_flip: bool = False) -> Tensor:
    """The head's outputs of ``net`` on ``x``; with ``tta_flip`` (test-time augmentation of image
    batches ``[..., C, H, W]``), averaged with those of the mirror images."""
    outputs = head(net(x))
    if tta_flip:
        outputs = (outputs + head(net(x.flip(-1)))) / 2
    return outputs


class Head(nn.Module):
    """What a stack's outputs become: predictions, each member's loss and a metric per member."""

    members: int
    metric_name: str

    def loss(self, preds: Tensor, target: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
        raise NotImplementedError

    def metric(self) -> Metric:
        raise NotImplementedError

    def predictions(self, outputs: Tensor) -> Tensor:
        """Outputs as predictions to average over members: regression values, class probabilities."""
        return outputs


class RegressionHead(Head):
    """One output per row, predicted relative to each member's training mean (``offset``), so
    training starts at the mean target instead of walking there; MSE or Huber loss; RMSE or MAE,
    on the learnt scale or, with ``inverse``, on the original scale of a transformed target."""

    METRICS: ClassVar[dict[str, type]] = {"rmse": StackedRMSE, "mae": StackedMAE}
    offset: Tensor

    def __init__(
        self,
        members: int,
        offset: Tensor | None = None,
        loss: str = "mse",
        huber_delta: float = 1.0,
        metric: str = "rmse",
        inverse: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if loss not in ("mse", "huber"):
            raise ValueError(f"loss {loss!r} is unknown: expected 'mse' or 'huber'")
        if metric not in self.METRICS:
            raise ValueError(f"metric {metric!r} is not a regression metric: expected one of {', '.join(self.METRICS)}")
        self.members, self.loss_name, self.huber_delta = members, loss, huber_delta
        self.metric_name, self.inverse = metric, inverse
        # [M, 1]: added to a member's [M, B] predictions as it is
        self.register_buffer(
            "offset", torch.zeros(members, 1) if offset is None else offset.float().reshape(members, 1)
        )

    def forward(self, outputs: Tensor) -> Tensor:
        return outputs.squeeze(-1) + self.offset

    def loss(self, preds: Tensor, target: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
        if self.loss_name == "huber":
            per_row = F.huber_loss(preds, target, reduction="none", delta=self.huber_delta)
        else:
            per_row = (preds - target).square()
        return member_mean(per_row, weight, rows)

    def metric(self) -> Metric:
        return self.METRICS[self.metric_name](self.members, inverse=self.inverse)


class ClassificationHead(Head):
    """Class logits; cross-entropy (optionally label-smoothed) loss; accuracy, log-loss or ROC AUC."""

    METRICS: ClassVar[dict[str, type]] = {"acc": StackedAccuracy, "logloss": StackedLogLoss, "auc": StackedAUROC}

    def __init__(self, members: int, label_smoothing: float = 0.0, metric: str = "acc") -> None:
        super().__init__()
        if metric not in self.METRICS:
            raise ValueError(
                f"metric {metric!r} is not a classification metric: expected one of {', '.join(self.METRICS)}"
            )
        self.members, self.label_smoothing, self.metric_name = members, label_smoothing, metric

    def forward(self, outputs: Tensor) -> Tensor:
        return outputs

    def loss(self, preds: Tensor, target: Tensor, weight: Tensor, rows: Tensor) -> Tensor:
        per_row = F.cross_entropy(
            preds.flatten(0, 1), target.flatten(), reduction="none", label_smoothing=self.label_smoothing
        ).view_as(weight)
        return member_mean(per_row, weight, rows)

    def metric(self) -> Metric:
        return self.METRICS[self.metric_name](self.members)

    def predictions(self, outputs: Tensor) -> Tensor:
        return outputs.softmax(dim=-1)
