"""The MLP's own member stack: the same contract as ``MemberStack``, faster on small tabular nets.

Built from the members' plain ``MLP`` modules (so it starts from exactly their weights), it holds
each linear layer's weights as ``[M, in, out]`` and runs one batched matmul per layer. Two tricks
on top: a one-output layer is a multiply-and-sum, on a CPU's cores a third to a half faster than a
batched matrix-vector product, on every device (one form, so the same arithmetic everywhere); and
for sparse rows (one-hot encoded tables, two thirds zeros) the first layer can sum the weight rows
of each row's nonzero entries (``embedding_bag``) instead of multiplying all columns, where
``project.engine.layout.choose_first_layer`` says so. ``tests/test_engine.py`` checks it gives the
fold scores of ``MemberStack``, and the same outputs either way.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from project.data.batches import SparseRows
from project.engine.stacking import HAND_STACKED, HandStack
from project.models.mlp import ACTIVATIONS, MLP


class StackedLinear(nn.Module):
    """``M`` independent linear layers applied to ``[M, B, in]``: weight ``[M, in, out]``, bias ``[M, 1, out]``."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        self.weight = nn.Parameter(torch.stack([layer.weight.detach().T for layer in linears]).contiguous())
        self.bias = nn.Parameter(torch.stack([layer.bias.detach()[None] for layer in linears]))

    def forward(self, x: Tensor, nonzero: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``nonzero``: x's nonzero entries as rows of the members' stacked weights (``row_offsets``)
        and values ``[M, B, K]`` (padding entries have value 0), for a wide layer to sum K weight rows
        per sample instead of a matmul."""
        if nonzero is not None and self.out_features > 1:
            return _NonzeroLinear.apply(x, *nonzero, self.weight, self.bias)
        if self.out_features == 1:
            return (x * self.weight.transpose(1, 2)).sum(dim=-1, keepdim=True) + self.bias
        return torch.baddbmm(self.bias, x, self.weight)

    def member_state(self) -> dict[str, Tensor]:
        """``nn.Linear``'s weight and bias, with a leading member dimension."""
        return {"weight": self.weight.detach().transpose(1, 2), "bias": self.bias.detach().squeeze(1)}

    def extra_repr(self) -> str:
        return f"members={self.weight.shape[0]}, in_features={self.in_features}, out_features={self.out_features}"


def row_offsets(members: int, n_features: int, like: Tensor) -> Tensor:
    """``[M, 1, 1]``: added to column indices of each member's nonzero entries, they become rows of the
    members' stacked weights ``[M * F, out]`` (member m's column c is row ``m * F + c``)."""
    return n_features * torch.arange(members, dtype=like.dtype, device=like.device)[:, None, None]


class _NonzeroLinear(torch.autograd.Function):
    """``baddbmm(bias, x, weight)`` with the product summed over x's nonzero entries only (one
    ``embedding_bag`` over the members' stacked weight rows); the backward pass is the dense one."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, value: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        members, batch, width = rows.shape
        out = F.embedding_bag(
            rows.reshape(-1, width),
            weight.reshape(-1, weight.shape[-1]),
            per_sample_weights=value.reshape(-1, width),
            mode="sum",
        )
        ctx.save_for_backward(x, weight)
        return out.view(members, batch, -1).add_(bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(x.transpose(1, 2), grad) if ctx.needs_input_grad[3] else None
        grad_bias = grad.sum(dim=1, keepdim=True) if ctx.needs_input_grad[4] else None
        return grad_x, None, None, grad_weight, grad_bias


class StackedMLP(HandStack):
    """The members' ``MLP`` layers, index for index, with every ``nn.Linear`` a ``StackedLinear``."""

    kind = "hand-stacked MLP"

    @classmethod
    def covers(cls, module: nn.Module) -> bool:
        """Linear layers, activations and dropout: an MLP with a numeric embedding takes the
        generic stack."""
        plain = (nn.Linear, nn.Flatten, nn.Dropout, *ACTIVATIONS.values())
        return isinstance(module, MLP) and all(isinstance(layer, plain) for layer in module.layers)

    def __init__(self, modules: Sequence[MLP]) -> None:
        super().__init__()
        first = modules[0]
        self.members = len(modules)
        layers: list[nn.Module] = []
        for i, layer in enumerate(first.layers):
            if isinstance(layer, nn.Linear):
                layers.append(StackedLinear([cast(nn.Linear, m.layers[i]) for m in modules]))
            elif isinstance(layer, nn.Flatten):
                layers.append(nn.Flatten(2))  # behind the member and batch dimensions
            else:
                layers.append(copy.deepcopy(layer))  # activations and dropout: no parameters
        self.layers = nn.Sequential(*layers)
        self.skip = StackedLinear([cast(nn.Linear, m.skip) for m in modules]) if first.skip is not None else None
        # the first layer sums the weight rows of the nonzero entries where it is a hidden layer (a
        # one-output layer multiplies and sums), and not behind input dropout, which drops features
        first_layer = self.layers[1]
        self.accepts_nonzero = isinstance(first_layer, StackedLinear) and first_layer.out_features > 1
        self._offsets: Tensor | None = None  # row_offsets, made once for the features' width and device

    def forward(self, x: Tensor | SparseRows) -> Tensor:
        nonzero = None
        if isinstance(x, SparseRows):
            if self._offsets is None or self._offsets.device != x.columns.device:
                self._offsets = row_offsets(self.members, x.dense.shape[-1], x.columns)
            nonzero = x.columns + self._offsets, x.value
            x = x.dense
        # samples flattened behind the member and batch dimensions (table rows already are), which
        # the linear path also takes
        out = flat = x if x.dim() == 3 else self.layers[0](x)
        for i, layer in enumerate(self.layers):
            if i:
                out = layer(out, nonzero) if i == 1 and nonzero is not None else layer(out)
        return out if self.skip is None else out + self.skip(flat)

    def member_state_dict(self) -> dict[str, Tensor]:
        """The plain MLP's state_dict (``layers.<i>.weight`` ...), with a leading member dimension."""
        state = {}
        for prefix, layer in [*((f"layers.{i}", m) for i, m in enumerate(self.layers)), ("skip", self.skip)]:
            if isinstance(layer, StackedLinear):
                state.update({f"{prefix}.{k}": v for k, v in layer.member_state().items()})
        return state

    def param_groups(self, weight_decay: float) -> list[dict]:
        named = list(self.named_parameters())
        return [
            {"params": [p for n, p in named if n.endswith("weight")], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0},
        ]


HAND_STACKED[MLP] = StackedMLP
