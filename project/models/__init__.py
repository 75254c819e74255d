"""What a user writes: plain ``nn.Module``s, batch-first, chosen by name from a registry."""

from project.models import cnn, mlp  # noqa: F401  (register the built-in models)
from project.models.cnn import CNN
from project.models.mlp import MLP
from project.models.registry import MODELS, create_model, register_model

__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "create_model",
    "register_model",
]
