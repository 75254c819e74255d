"""K copies of a plain module trained as one: the member stacks the engine trains folds with.

A *member stack* takes ``[M, B, *in_shape]`` and returns ``[M, B, out]``; member ``m`` is one
fold's model and only ever sees its own weights, inputs and dropout masks. Every stack keeps its
parameters with a leading member dimension and can give them back in the plain module's layout
(``member_state_dict``), which is what is saved and what a fold's plain module loads.

``MemberStack`` stacks any module the way PyTorch's model-ensembling tutorial does
(``torch.func.stack_module_state`` + ``functional_call`` under ``vmap(randomness="different")``).
``build_stack`` uses a hand-stacked implementation instead where one is registered for the
module's class (``project.engine.stacked_mlp`` for the MLP): the same contract, faster.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

# module class -> the faster stack built from a list of its instances
HAND_STACKED: dict[type[nn.Module], type[HandStack]] = {}


class StackingError(ValueError):
    """A module that vmap cannot stack; says what to use instead."""


def running_statistics(module: nn.Module) -> tuple[str, str] | None:
    """The first layer of ``module`` that keeps running statistics (its class and path), which vmap
    cannot batch: a buffer updated in place by every forward, as BatchNorm's running mean."""
    for path, sub in module.named_modules():
        if getattr(sub, "track_running_stats", False):
            return type(sub).__name__, path
    return None


def refuse_running_statistics(module: nn.Module, name: str) -> None:
    """Refuse to stack a module that keeps running statistics, saying what to use instead."""
    found = running_statistics(module)
    if found is not None:
        kind, path = found
        raise StackingError(
            f"model {name!r}: {kind} at {path!r} keeps running statistics, which fold stacking "
            f"(torch.func.vmap) cannot batch; use GroupNorm, {kind}(..., track_running_stats=False), "
            "or --sequential-folds"
        )


class Stack(nn.Module):
    """What the engine asks of a stack of M members: ``[M, B, ...] -> [M, B, out]``, each member's
    weights, and parameter groups for weight decay."""

    members: int
    kind: str
    accepts_nonzero: bool = False  # its first layer can sum the weight rows of a row's nonzero entries

    def member_state_dict(self) -> dict[str, Tensor]:
        """The plain module's state_dict, each tensor with a leading member dimension."""
        raise NotImplementedError

    def param_groups(self, weight_decay: float) -> list[dict]:
        raise NotImplementedError


class HandStack(Stack):
    """A hand-stacked implementation of a plain module class: the same contract, faster."""

    @classmethod
    def covers(cls, module: nn.Module) -> bool:
        """Whether this implementation holds ``module`` as it is configured."""
        return True


def hand_stacked_form(module: nn.Module) -> type[HandStack] | None:
    """The hand-stacked implementation registered for ``module``'s class that covers it, if any."""
    form = HAND_STACKED.get(type(module))
    return form if form is not None and form.covers(module) else None


class MemberStack(Stack):
    """M copies of one module, stacked with ``torch.func``.

    ``self.module`` is a copy of the first member whose parameters and buffers are replaced by the
    members' stacked ones (same names, a leading member dimension); it is never called directly,
    only through ``functional_call`` with one member's slices. A single member skips vmap.
    """

    kind = "torch.func vmap"

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        params, buffers = stack_module_state(list(modules))
        self.members = len(modules)
        self.module = copy.deepcopy(modules[0])
        for name, value in params.items():
            owner, leaf = _owner(self.module, name)
            setattr(owner, leaf, nn.Parameter(value.detach()))
        for name, value in buffers.items():
            owner, leaf = _owner(self.module, name)
            setattr(owner, leaf, value)

    def _member_forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.module, (params, buffers), (x,))

    def forward(self, x: Tensor) -> Tensor:
        params: dict[str, Tensor] = dict(self.module.named_parameters())
        buffers: dict[str, Tensor] = dict(self.module.named_buffers())
        if self.members == 1:
            only = ({k: v[0] for k, v in params.items()}, {k: v[0] for k, v in buffers.items()})
            return functional_call(self.module, only, (x[0],)).unsqueeze(0)
        return torch.vmap(self._member_forward, randomness="different")(params, buffers, x)

    def member_state_dict(self) -> dict[str, Tensor]:
        """The plain module's state_dict, each tensor with a leading member dimension."""
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on the weights of linear and convolution layers (two or more dimensions
        per member), none on biases and normalisation parameters."""
        decay: list[Tensor] = []
        no_decay: list[Tensor] = []
        excluded: set[str] = getattr(self.module, "no_weight_decay", set)()  # timm's convention
        for name, p in self.module.named_parameters():
            (decay if p.dim() > 2 and name not in excluded else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class MemberList(Stack):
    """M modules run one after another, each on its own slice of ``[M, B, ...]``: the contract of a
    stack for modules that cannot be stacked (running statistics, an operation vmap refuses), and
    the arithmetic of folds trained one after another. What a saved model of such members predicts with."""

    kind = "one after another"

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = len(modules)
        self.nets = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([net(x[m]) for m, net in enumerate(self.nets)])

    def member_state_dict(self) -> dict[str, Tensor]:
        states = [net.state_dict() for net in self.nets]
        return {k: torch.stack([s[k].detach() for s in states]) for k in states[0]}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """As ``MemberStack``'s: weight decay on weights of two or more dimensions."""
        decay: list[Tensor] = []
        no_decay: list[Tensor] = []
        for net in self.nets:
            excluded: set[str] = getattr(net, "no_weight_decay", set)()
            for name, p in net.named_parameters():
                (decay if p.dim() > 1 and name not in excluded else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return module.get_submodule(path), leaf


def inference_stack(modules: Sequence[nn.Module], name: str) -> Stack:
    """The stack a saved model predicts with: the hand-stacked form where one covers the members,
    else the members one after another, which any module allows."""
    form = hand_stacked_form(modules[0])
    return build_stack(modules, name) if form is not None else MemberList(modules)


def build_stack(modules: Sequence[nn.Module], name: str, hand_stacked: bool = True) -> Stack:
    """The member stack of ``modules`` (instances of one class, each initialised from its own seed):
    a hand-stacked implementation where one is registered and wanted, else ``MemberStack``."""
    kinds = {type(m) for m in modules}
    if len(kinds) != 1:
        raise StackingError(
            f"model {name!r}: members of several classes cannot be stacked: {sorted(k.__name__ for k in kinds)}"
        )
    form = hand_stacked_form(modules[0])
    if hand_stacked and form is not None:
        return form(modules)
    if len(modules) > 1:
        refuse_running_statistics(modules[0], name)
    return MemberStack(modules)


@torch.no_grad()
def clip_member_grad_norm_(parameters: Sequence[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each member alone: every member's gradients (the
    slices ``p.grad[m]``) are scaled to a norm of at most ``max_norm``; returns the norms ``[M]``."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack([g.reshape(g.shape[0], -1).square().sum(dim=1) for g in grads]).sum(dim=0).sqrt()
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *([1] * (g.dim() - 1))))
    return norms
