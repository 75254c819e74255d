"""The multilayer perceptron of the d2l chapters, as a plain batch-first module.

``hidden_sizes=()`` is the linear model. Inputs of any shape are flattened, so the same module
fits table rows ``[B, F]`` and images ``[B, C, H, W]``. The K fold copies of it train at once
through the engine (``project.engine``), which knows a faster stacked form of this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from project.models.registry import register_model

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@register_model("mlp")
class MLP(nn.Module):
    """Linear layers with an activation and dropout after each hidden one.

    ``dropout`` is one rate or one per hidden layer; ``input_dropout`` drops input features;
    ``linear_skip`` adds a linear path from the inputs to the output beside the hidden layers
    ("wide and deep"), so the hidden layers only learn what a linear model misses.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int,
        hidden_sizes: Sequence[int] = (256,),
        dropout: float | Sequence[float] = 0.0,
        activation: str = "relu",
        input_dropout: float = 0.0,
        linear_skip: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown: expected one of {', '.join(ACTIVATIONS)}")
        hidden_sizes = [int(h) for h in hidden_sizes]
        dropouts = [dropout] * len(hidden_sizes) if isinstance(dropout, (int, float)) else list(dropout)
        if len(dropouts) != len(hidden_sizes):
            raise ValueError(f"dropout has {len(dropouts)} values for {len(hidden_sizes)} hidden layers")
        for p in [*dropouts, input_dropout]:
            if not 0.0 <= p < 1.0:
                raise ValueError(f"dropout {p} is outside [0, 1)")
        in_features = math.prod(in_shape)
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        sizes = [in_features, *hidden_sizes]
        for n_in, n_out, p in zip(sizes[:-1], sizes[1:], dropouts):
            layers += [nn.Linear(n_in, n_out), ACTIVATIONS[activation]()]
            if p > 0:
                layers.append(nn.Dropout(p))
        layers.append(nn.Linear(sizes[-1], out_features))
        self.layers = nn.Sequential(*layers)
        self.skip = nn.Linear(in_features, out_features) if linear_skip and hidden_sizes else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return out if self.skip is None else out + self.skip(torch.flatten(x, 1))
