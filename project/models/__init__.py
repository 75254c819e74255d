"""The MLP and the LightningModules that train it."""

from project.models.mlp import MLP, StackedLinear
from project.models.modules import MLPClassifier, MLPRegressor, StackedModule

__all__ = ["MLP", "MLPClassifier", "MLPRegressor", "StackedLinear", "StackedModule"]
