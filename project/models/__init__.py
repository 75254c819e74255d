"""What a user writes: plain models chosen by name, the heads of each kind of task, and the
thin LightningModule that trains a model's fold copies."""

from project.models import cnn, mlp  # noqa: F401  (register the built-in models)
from project.models.cnn import CNN
from project.models.heads import ClassificationHead, RegressionHead
from project.models.mlp import MLP
from project.models.module import FoldModule
from project.models.registry import MODELS, create_model, register_model

__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "ClassificationHead",
    "FoldModule",
    "RegressionHead",
    "create_model",
    "register_model",
]
