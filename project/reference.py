"""The plain way, one fold at a time: the LightningModule a reader of the d2l chapters writes.

It trains any plain model on a task's DataModule for one fold (``task.datamodule(fold=k)``), whose
standard batches are ``(x, y)``, with a plain ``L.Trainer``. It is what the engine
(``project.engine``) does for K folds at once, written out: a test checks that the two give the
same fold scores, within noise over seeds.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn


class PlainModule(L.LightningModule):
    """A model, its loss and metric, and AdamW with weight decay on the weights alone.

    Regression predicts relative to ``offset`` (the fold's mean training target), as the engine's
    head does, and scores RMSE; classification scores accuracy over ``classes``."""

    def __init__(
        self,
        net: nn.Module,
        kind: str = "regression",
        classes: int = 0,
        offset: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.val_metric = (
            torchmetrics.MeanSquaredError(squared=False)
            if kind == "regression"
            else torchmetrics.Accuracy(task="multiclass", num_classes=classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) + self.offset if self.hparams["kind"] == "regression" else out

    def model_step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        preds = self(x)
        loss = F.mse_loss(preds, y) if self.hparams["kind"] == "regression" else F.cross_entropy(preds, y)
        return loss, preds, y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss, _, _ = self.model_step(batch)
        self.log("train/loss", loss, on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        _, preds, y = self.model_step(batch)
        self.val_metric.update(preds, y)
        self.log("val/metric", self.val_metric, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        named = list(self.net.named_parameters())
        groups = [
            {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": self.hparams["weight_decay"]},
            {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams["lr"])
