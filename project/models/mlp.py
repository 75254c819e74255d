"""A plain MLP whose weights carry a leading member dimension, so K fold models train as one.

With ``members=1`` it is the ordinary MLP of the d2l chapters; ``hidden_sizes=()`` is the linear
model. Inputs are ``[M, B, F]`` and outputs ``[M, B, out]``; every layer is a batched matmul (or,
for sparse inputs, a sum of the weight rows of their nonzero entries), so member ``m`` only ever
sees its own weights, inputs and dropout masks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class StackedLinear(nn.Module):
    """``M`` independent linear layers applied to ``[M, B, in]`` with one batched matmul."""

    def __init__(self, in_features: int, out_features: int, seeds: Sequence[int]) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(len(seeds), in_features, out_features))
        self.bias = nn.Parameter(torch.empty(len(seeds), 1, out_features))
        self.reset_parameters(seeds)

    @torch.no_grad()
    def reset_parameters(self, seeds: Sequence[int]) -> None:
        # nn.Linear's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn per member from its own seed
        bound = 1.0 / math.sqrt(self.in_features)
        for m, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(seed)
            self.weight[m].uniform_(-bound, bound, generator=generator)
            self.bias[m].uniform_(-bound, bound, generator=generator)

    def forward(self, x: Tensor, nonzero: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``nonzero``: x's nonzero entries as rows of the members' stacked weights (``nonzero_rows``)
        and values ``[M, B, K]`` (padding entries have value 0), for a wide layer to sum K weight rows
        per sample instead of a matmul."""
        if nonzero is not None and self.out_features > 1:
            return _NonzeroLinear.apply(x, *nonzero, self.weight, self.bias)
        if self.out_features == 1:
            # a regression head: on CPU a batched matrix-vector product takes several times as long
            # (forward and backward) as this multiply-and-sum over the features
            return (x * self.weight.transpose(1, 2)).sum(dim=-1, keepdim=True) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"members={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


def nonzero_rows(index: Tensor, n_features: int) -> Tensor:
    """Column indices ``[..., M, B, K]`` of each member's nonzero entries as rows of the members'
    stacked weights ``[M * F, out]``: member m's column c is row ``m * F + c``. Computed once per
    chunk of mini-batches rather than once per step."""
    members = index.shape[-3]
    return index + n_features * torch.arange(members, dtype=index.dtype, device=index.device)[:, None, None]


class _NonzeroLinear(torch.autograd.Function):
    """``baddbmm(bias, x, weight)`` with the product summed over x's nonzero entries only (one
    ``embedding_bag`` over the members' stacked weight rows); the backward pass is the dense one."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, value: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        members, batch, width = rows.shape
        out = F.embedding_bag(rows.reshape(-1, width), weight.reshape(-1, weight.shape[-1]),
                              per_sample_weights=value.reshape(-1, width), mode="sum")
        ctx.save_for_backward(x, weight)
        return out.view(members, batch, -1).add_(bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(x.transpose(1, 2), grad) if ctx.needs_input_grad[3] else None
        grad_bias = grad.sum(dim=1, keepdim=True) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_weight, grad_bias


class MLP(nn.Module):
    """Linear layers with activation and dropout between them; ``dropout`` is one value or one per
    hidden layer, ``input_dropout`` drops input features, ``linear_skip`` adds a linear path."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_sizes: Sequence[int] = (),
        dropout: float | Sequence[float] = 0.0,
        activation: str = "relu",
        input_dropout: float = 0.0,
        members: int = 1,
        seed: int = 0,
        member_ids: Sequence[int] | None = None,
        linear_skip: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown: expected one of {', '.join(ACTIVATIONS)}")
        hidden_sizes = list(hidden_sizes)
        dropouts = [dropout] * len(hidden_sizes) if isinstance(dropout, (int, float)) else list(dropout)
        if len(dropouts) != len(hidden_sizes):
            raise ValueError(f"dropout has {len(dropouts)} values for {len(hidden_sizes)} hidden layers")
        for p in [*dropouts, input_dropout]:
            if not 0.0 <= p < 1.0:
                raise ValueError(f"dropout {p} is outside [0, 1)")
        member_ids = list(range(members)) if member_ids is None else list(member_ids)
        if len(member_ids) != members:
            raise ValueError(f"member_ids has {len(member_ids)} entries for {members} members")

        layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout > 0 else []
        sizes = [in_features, *hidden_sizes, out_features]
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            # layer i of member m gets its own seed, whatever else is stacked beside it
            layers.append(StackedLinear(n_in, n_out, [seed * 1_000_003 + 7919 * m + 104_729 * i for m in member_ids]))
            if i < len(hidden_sizes):
                layers.append(ACTIVATIONS[activation]())
                if dropouts[i] > 0:
                    layers.append(nn.Dropout(dropouts[i]))
        self.layers = nn.Sequential(*layers)
        # "wide and deep": a linear path from the inputs beside the hidden layers, so the net only
        # has to learn what a linear model misses (what wins on House Prices' tabular data)
        self.skip = None
        if linear_skip and hidden_sizes:
            self.skip = StackedLinear(in_features, out_features, [seed * 1_000_003 + 7919 * m + 3 for m in member_ids])

    @torch.no_grad()
    def start_from(self, output: Tensor) -> None:
        """Set the output bias of each member to ``output[m]`` (and the linear path's to zero): a
        regressor then starts from its training mean, log prices near 12 instead of 0, which plain
        SGD would otherwise spend most of its epochs walking to."""
        self.layers[-1].bias.copy_(output.reshape(self.layers[-1].bias.shape))
        if self.skip is not None:
            self.skip.bias.zero_()

    def forward(self, x: Tensor, nonzero: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``nonzero`` (optional): x's nonzero entries, which the first layer can sum instead of
        multiplying every feature (see ``StackedLinear``); unused behind input dropout."""
        out = x
        for i, layer in enumerate(self.layers):
            out = layer(out, nonzero) if i == 0 and isinstance(layer, StackedLinear) else layer(out)
        return out if self.skip is None else out + self.skip(x)
