"""LightningModules that train an MLP with one member per fold: a regressor and a classifier.

Each member's loss is the weighted mean over its own rows (padding rows weigh 0); the training
loss is their sum, so each member receives exactly the gradient it would get alone, and AdamW's
per-element update keeps the members independent.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from project.models.metrics import StackedAccuracy, StackedRMSE
from project.models.mlp import nonzero_rows
from project.models.optim import FusedAdamW

OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("none", "cosine", "onecycle")


def nonzero_entries(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor] | None:
    """The batch's nonzero feature entries where its features are sparse: (rows of the members'
    stacked first-layer weights, values), see ``nonzero_rows``."""
    if "nz_index" not in batch:
        return None
    return nonzero_rows(batch["nz_index"], batch["x"].shape[-1]), batch["nz_value"]


class StackedModule(L.LightningModule):
    """The shared step, optimiser, schedule and per-epoch history; subclasses supply loss and metric."""

    metric_name: str = ""
    higher_is_better: bool = False

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        scheduler: str = "none",
        momentum: float = 0.9,
    ) -> None:
        super().__init__()
        # the optimiser steps inside training_step, once per mini-batch of a chunk
        self.automatic_optimization = False
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {optimizer!r} is unknown: expected one of {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r} is unknown: expected one of {', '.join(SCHEDULERS)}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.n_members = next(net.parameters()).shape[0]
        self.val_metric = self.make_metric()
        self.history: list[dict] = []
        self.diverged: dict | None = None

    def make_metric(self):
        raise NotImplementedError

    def member_loss(self, output: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        """Per-member loss ``[M]``: the weighted sum over rows, with each member's weights summing to
        one (padding rows weigh 0), which makes it the mean over the member's own rows."""
        raise NotImplementedError

    def forward(self, x: Tensor, nonzero: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.net(x, nonzero)

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros(self.n_members, device=self.device)
        self._weight_sum = torch.zeros(self.n_members, device=self.device)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """``batch`` is a chunk of S mini-batches ``[S, M, B, ...]``: one optimiser step for each.

        The raw optimiser is stepped, without Lightning's per-step hooks (on_before_backward and
        the like): on small models those hooks cost more than the step itself. Mixed precision and
        gradient clipping plugins are therefore not applied inside a chunk."""
        optimizer, scheduler = self.optimizers(use_pl_optimizer=False), self.lr_schedulers()
        rows = batch["w"].sum(dim=-1)
        weight = batch["w"] / rows.clamp(min=1).unsqueeze(-1)  # each member's rows average to its loss
        parts = [batch["x"], batch["y"], weight, *(nonzero_entries(batch) or ())]
        # padding rows (weight 0) sit at the end of a member's epoch, so an epoch's last mini-batch
        # is mostly padding: each step is cut to the rows some member still has (one sync a chunk)
        widths = (batch["w"] != 0).sum(dim=-1).amax(dim=-1).tolist()
        full = batch["w"].shape[-1]
        ones = torch.ones(self.n_members, device=self.device)  # the gradient of the members' summed loss
        losses = []
        for step, width in enumerate(widths):
            x, y, w, *nonzero = (part[step] if width == full else part[step, :, :width] for part in parts)
            per_member = self.member_loss(self(x, tuple(nonzero) or None), y, w)
            optimizer.zero_grad(set_to_none=True)
            per_member.backward(ones)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(per_member.detach())
        # accumulate on device, once per chunk: no host sync per step
        self._loss_sum += (torch.stack(losses) * rows).sum(dim=0)
        self._weight_sum += rows.sum(dim=0)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_metric.update(self(batch["x"], nonzero_entries(batch)), batch["y"], batch["w"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["x"], nonzero_entries(batch))

    def on_train_start(self) -> None:
        self.val_metric.reset()

    def _epoch_record(self) -> dict:
        train_loss = (self._loss_sum / self._weight_sum.clamp(min=1)).cpu()
        record = {"epoch": self.current_epoch, "train_loss": train_loss.tolist()}
        if not torch.isfinite(train_loss).all() and self.diverged is None:
            bad = [m for m, v in enumerate(train_loss.tolist()) if not math.isfinite(v)]
            self.diverged = {"epoch": self.current_epoch, "members": bad}
            self.trainer.should_stop = True
        return record

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        scores = self.val_metric.compute().cpu().reshape(-1)  # torchmetrics squeezes a single member
        self.val_metric.reset()
        record = self._epoch_record()
        record[f"val_{self.metric_name}"] = scores.tolist()
        self.history.append(record)
        metrics = {f"val/{self.metric_name}": scores.mean(), "train/loss": torch.tensor(record["train_loss"]).mean()}
        if self.trainer.loggers:
            self.log_dict(metrics)
        else:
            # what callbacks such as EarlyStopping read, without self.log's bookkeeping: a log call
            # costs about a millisecond, as much as a small model's whole epoch
            self.trainer.callback_metrics.update(metrics)

    def on_train_epoch_end(self) -> None:
        if not self.history or self.history[-1]["epoch"] != self.current_epoch:
            # no validation this epoch (the final refit): record the training loss alone
            self.history.append(self._epoch_record())

    def on_test_epoch_end(self) -> None:
        scores = self.val_metric.compute().cpu().reshape(-1)  # torchmetrics squeezes a single member
        self.val_metric.reset()
        self.test_scores = scores.tolist()
        self.log(f"test/{self.metric_name}", scores.mean())

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for name, p in self.net.named_parameters() if name.endswith("weight")]
        no_decay = [p for name, p in self.net.named_parameters() if not name.endswith("weight")]
        groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # fused kernels (CPU and CUDA): on a small model, torch's per-tensor loops cost more than the update
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, fused=True)
        else:
            optimizer = FusedAdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return optimizer
        self.trainer.fit_loop.setup_data()  # the training loader knows its optimiser steps per epoch
        total = self.trainer.max_epochs * self.trainer.train_dataloader.steps_per_epoch
        if hp.scheduler == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total)
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}



class MLPRegressor(StackedModule):
    """MSE (or Huber) on the target; reports RMSE, which on log(SalePrice) is the Kaggle metric."""

    metric_name = "rmse"

    def __init__(self, net: nn.Module, loss: str = "mse", huber_delta: float = 1.0, **kwargs) -> None:
        if loss not in ("mse", "huber"):
            raise ValueError(f"loss {loss!r} is unknown: expected 'mse' or 'huber'")
        super().__init__(net, **kwargs)
        self.loss_name, self.huber_delta = loss, huber_delta

    def make_metric(self) -> StackedRMSE:
        return StackedRMSE(self.n_members)

    def forward(self, x: Tensor, nonzero: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return self.net(x, nonzero).squeeze(-1)

    def member_loss(self, output: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        if self.loss_name == "huber":
            loss = F.huber_loss(output, target, reduction="none", delta=self.huber_delta)
        else:
            loss = (output - target).square()
        return (loss * weight).sum(dim=1)


class MLPClassifier(StackedModule):
    """Cross-entropy (with optional label smoothing); reports accuracy."""

    metric_name = "acc"
    higher_is_better = True

    def __init__(self, net: nn.Module, label_smoothing: float = 0.0, **kwargs) -> None:
        super().__init__(net, **kwargs)
        self.label_smoothing = label_smoothing

    def make_metric(self) -> StackedAccuracy:
        return StackedAccuracy(self.n_members)

    def member_loss(self, output: Tensor, target: Tensor, weight: Tensor) -> Tensor:
        loss = F.cross_entropy(output.flatten(0, 1), target.flatten(), reduction="none",
                               label_smoothing=self.label_smoothing).view_as(weight)
        return (loss * weight).sum(dim=1)
