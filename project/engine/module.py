"""The LightningModule that trains the K fold copies of a model as one.

It is thin, like lightning-hydra-template's ``MNISTLitModule``: an injected net, an injected head
(loss and metric), one ``model_step`` shared by training, validation and test, and a torchmetrics
object per stage. The net is a *member stack* (``project.engine``): ``[M, B, ...] -> [M, B, out]``,
member ``m`` being fold ``m``'s copy of a plain model, so every loss and metric here keeps one
value per member. A batch is ``{"x", "y", "w", "rows"}`` (see ``project.data.batches``). Subclass
it for a new kind of loss; a new model needs no subclass (see
``project/models/cnn.py``). How steps are batched into Lightning steps is the engine's business
(``project/engine/chunks.py``).
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from project.engine.heads import Head, head_outputs
from project.engine.metrics import MemberMean
from project.engine.optim import create_optimizer, create_scheduler
from project.engine.stacking import Stack, clip_member_grad_norm_


class FoldModule(L.LightningModule):
    """``history`` keeps one record per epoch (``train_loss`` and ``val_<metric>``, one value per
    member); a NaN or infinite training loss stops the fit and is recorded in ``diverged``.

    Each epoch's figures reach every logger under stable names: ``train/loss``, ``val/<metric>``
    and ``test/<metric>``, the mean over the fit's members, through ``self.log_dict``, so that
    callbacks watch them too; and the same with ``/<member>`` for each member (``val/rmse/fold_2``;
    ``seed_0`` for a refit's, ``member_names`` naming them), handed to the loggers at the same step,
    as Lightning's ``LearningRateMonitor`` hands its figures. A fit of K folds is one stack that a
    callback stops or checkpoints as a whole, so it watches the mean; and ``self.log`` costs about
    0.2 ms a key an epoch, as much as a small table's whole epoch for ten keys (docs/speed.md)."""

    def __init__(
        self,
        net: Stack,
        head: Head,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        scheduler: str = "none",
        gradient_clip_val: float | None = None,
        member_names: list[str] | None = None,
        tta_flip: bool = False,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.save_hyperparameters(ignore=["net", "head"])
        self.net, self.head = net, head
        self.train_loss = MemberMean(net.members)
        self.val_metric, self.test_metric = head.metric(), head.metric()
        self.member_names = member_names or [f"member_{m}" for m in range(net.members)]
        self.history: list[dict] = []
        self.diverged: dict | None = None
        self.test_scores: list[float] = []

    @property
    def metric_name(self) -> str:
        return self.head.metric_name

    def forward(self, x: Tensor) -> Tensor:
        return head_outputs(self.net, self.head, x, self.hparams["tta_flip"] and not self.training)

    def model_step(self, batch: dict) -> tuple[Tensor, Tensor]:
        """Each member's loss ``[M]`` and the predictions ``[M, B, ...]``."""
        preds = self(batch["x"])
        return self.head.loss(preds, batch["y"], batch["w"], batch["rows"]), preds

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        loss, _ = self.model_step(batch)
        self.train_loss.update(loss.detach(), batch["rows"])
        return loss.sum()  # each member's gradient is that of its own loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, preds = self.model_step(batch)
        self.val_metric.update(preds, batch["y"], batch["w"])

    def test_step(self, batch: dict, batch_idx: int) -> None:
        _, preds = self.model_step(batch)
        self.test_metric.update(preds, batch["y"], batch["w"])

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self(batch["x"])

    def on_train_start(self) -> None:
        self.val_metric.reset()

    def on_train_epoch_start(self) -> None:
        self.train_loss.reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        scores = self.val_metric.compute().cpu().reshape(-1)  # torchmetrics squeezes a single member
        self.val_metric.reset()
        if self.trainer.state.fn != TrainerFn.FITTING:  # Trainer.validate (a reloaded checkpoint): scores alone
            self._log_epoch({f"val/{self.metric_name}": scores})
            return
        record = self._epoch_record()
        record[f"val_{self.metric_name}"] = scores.tolist()
        self.history.append(record)
        self._log_epoch({"train/loss": torch.tensor(record["train_loss"]), f"val/{self.metric_name}": scores})

    def on_train_epoch_end(self) -> None:
        if not self.history or self.history[-1]["epoch"] != self.current_epoch:
            # no validation this epoch (the final refit): record the training loss alone
            record = self._epoch_record()
            self.history.append(record)
            self._log_epoch({"train/loss": torch.tensor(record["train_loss"])})

    def on_test_epoch_end(self) -> None:
        scores = self.test_metric.compute().cpu().reshape(-1)
        self.test_metric.reset()
        self.test_scores = scores.tolist()
        self._log_epoch({f"test/{self.metric_name}": scores})

    def _log_epoch(self, figures: dict[str, Tensor]) -> None:
        """Each figure's mean over the members through ``self.log_dict``, and each member's value
        (``name/<member>``) to the loggers at the step Lightning logs the epoch's figures at."""
        self.log_dict({name: values.mean() for name, values in figures.items()})
        if not self.loggers:
            return
        members = {
            f"{name}/{member}": float(value)
            for name, values in figures.items()
            for member, value in zip(self.member_names, values.tolist())
        }
        members["epoch"] = self.current_epoch
        step = self._epoch_step()
        for logger in self.loggers:
            logger.log_metrics(members, step=step)

    def _epoch_step(self) -> int:
        """The step Lightning logs an epoch's figures at: its training batches so far, less the one
        it has not counted yet when a fit's epoch ends; outside a fit, the optimiser steps taken."""
        if self.trainer.state.fn != TrainerFn.FITTING:
            return self.global_step
        return (self.current_epoch + 1) * int(self.trainer.num_training_batches) - 1

    def _epoch_record(self) -> dict:
        train_loss = self.train_loss.compute().cpu().reshape(-1)  # torchmetrics squeezes a single member
        if not torch.isfinite(train_loss).all() and self.diverged is None:
            bad = [m for m, v in enumerate(train_loss.tolist()) if not math.isfinite(v)]
            self.diverged = {"epoch": self.current_epoch, "members": bad}
            self.trainer.should_stop = True
        return {"epoch": self.current_epoch, "train_loss": train_loss.tolist()}

    def optimizer_steps(self) -> int:
        """Optimiser steps in the whole fit, which a schedule spans."""
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = create_optimizer(hp.optimizer, self.net.param_groups(hp.weight_decay), hp.lr, hp.momentum)
        scheduler = create_scheduler(hp.scheduler, optimizer, hp.lr, self.optimizer_steps())
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Clip each member's gradients alone (the Trainer's ``gradient_clip_val``, else this
        module's): one norm over all folds would let one fold's gradients shrink another's."""
        clip = gradient_clip_val if gradient_clip_val is not None else self.hparams["gradient_clip_val"]
        if not clip:
            return
        if gradient_clip_algorithm == "value":  # element-wise: each member is clipped alone anyway
            torch.nn.utils.clip_grad_value_(self.net.parameters(), clip)
        else:
            clip_member_grad_norm_(list(self.net.parameters()), clip)
