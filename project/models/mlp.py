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
EMBEDDINGS = ("none", "periodic", "plr")


class PeriodicEmbedding(nn.Module):
    """Each input feature ``x_j`` as ``[sin(2 pi c_j x_j), cos(2 pi c_j x_j)]``, with ``frequencies``
    trainable frequencies ``c_j`` per feature drawn from N(0, ``scale``^2); with ``dim``, then a
    linear layer per feature and a ReLU ("PLR"). From Gorishniy et al., "On Embeddings for
    Numerical Features in Tabular Deep Learning" (NeurIPS 2022): an MLP on such embeddings learns
    the sharp, non-linear functions of single columns that boosted trees find easily."""

    def __init__(self, features: int, frequencies: int = 16, scale: float = 0.1, dim: int | None = None) -> None:
        super().__init__()
        self.frequencies = nn.Parameter(torch.randn(features, frequencies) * scale)
        self.weight = nn.Parameter(torch.empty(features, 2 * frequencies, dim)) if dim else None
        self.bias = nn.Parameter(torch.empty(features, dim)) if dim else None
        if self.weight is not None and self.bias is not None:
            bound = 1 / math.sqrt(2 * frequencies)  # nn.Linear's default, per feature
            nn.init.uniform_(self.weight, -bound, bound)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def out_features(self) -> int:
        features, frequencies = self.frequencies.shape
        return features * (self.bias.shape[1] if self.bias is not None else 2 * frequencies)

    def forward(self, x: Tensor) -> Tensor:
        angles = 2 * math.pi * self.frequencies * x[..., None]  # [B, F, k]
        v = torch.cat([angles.sin(), angles.cos()], dim=-1)
        if self.weight is not None and self.bias is not None:
            v = torch.relu(torch.einsum("bfk,fkd->bfd", v, self.weight) + self.bias)
        return v.flatten(1)


@register_model("mlp")
class MLP(nn.Module):
    """Linear layers with an activation and dropout after each hidden one.

    ``dropout`` is one rate or one per hidden layer; ``input_dropout`` drops input features;
    ``linear_skip`` adds a linear path from the inputs to the output beside the hidden layers
    ("wide and deep"), so the hidden layers only learn what a linear model misses.
    ``numeric_embedding`` embeds each input feature before the first layer: ``periodic`` (sines and
    cosines of ``embedding_frequencies`` trainable frequencies, initialised at ``embedding_scale``)
    or ``plr`` (those, then a linear layer of ``embedding_dim`` outputs and a ReLU per feature).
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
        numeric_embedding: str = "none",
        embedding_frequencies: int = 16,
        embedding_scale: float = 0.1,
        embedding_dim: int = 16,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown: expected one of {', '.join(ACTIVATIONS)}")
        if numeric_embedding not in EMBEDDINGS:
            raise ValueError(
                f"numeric_embedding {numeric_embedding!r} is unknown: expected one of {', '.join(EMBEDDINGS)}"
            )
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
        first = in_features
        if numeric_embedding != "none":
            dim = embedding_dim if numeric_embedding == "plr" else None
            embedding = PeriodicEmbedding(in_features, embedding_frequencies, embedding_scale, dim)
            layers.append(embedding)
            first = embedding.out_features
        sizes = [first, *hidden_sizes]
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

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay must not shrink: an embedding's frequencies (at zero every
        feature's embedding is constant)."""
        return {name for name, _ in self.named_parameters() if name.endswith("frequencies")}
