"""Each trick of the engine gives the numbers of the plain way: member stacks, the hand-stacked MLP,
chunked steps, per-member clipping, the measured fold layout and the fused optimiser."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch import nn

from project.config import TrainConfig
from project.cv import build_module, cross_validate, first_layer, fit, fold_layout
from project.data import batches
from project.data.batches import MemberFeatures, SparseRows
from project.engine import FoldModule, MemberStack, RegressionHead, StackingError, build_stack, choose_layout, layout
from project.engine.optim import FusedAdamW
from project.engine.stacked_mlp import StackedLinear, StackedMLP, row_offsets
from project.engine.stacking import clip_member_grad_norm_
from project.models import MLP, register_model
from project.tasks import Task, get_task
from tests.conftest import house_task_dm, write_idx_set

NO_DROPOUT_MLP = {"hidden_sizes": (16,), "dropout": 0.0, "linear_skip": True}


def mlps(count: int, **kwargs) -> list[MLP]:
    torch.manual_seed(0)
    return [MLP((4,), 1, (6,), **kwargs) for _ in range(count)]


@pytest.mark.parametrize("members", [1, 3])
def test_member_stack_is_each_member_alone(members):
    modules = mlps(members)
    stack = MemberStack(modules)
    x = torch.randn(members, 5, 4)
    expected = torch.stack([m(x[i]) for i, m in enumerate(modules)])
    torch.testing.assert_close(stack(x), expected)
    state = stack.member_state_dict()
    assert set(state) == set(modules[0].state_dict()) and state["layers.1.weight"].shape == (members, 6, 4)


@pytest.mark.parametrize("stacker", [MemberStack, StackedMLP], ids=["generic", "hand-stacked"])
def test_member_gradients_are_independent(stacker):
    """The summed loss gives each member exactly the gradient it gets alone."""
    torch.manual_seed(0)
    x, y, w = torch.randn(3, 8, 4), torch.randn(3, 8), torch.ones(3, 8)
    w[2, 5:] = 0
    modules = mlps(3, linear_skip=True)
    head = RegressionHead(3)
    stack = stacker(modules)
    head.loss(head(stack(x)), y, w, w.sum(dim=1)).sum().backward()
    stacked = dict((stack.module if stacker is MemberStack else stack).named_parameters())
    for m, module in enumerate(modules):
        alone = RegressionHead(1)
        alone.loss(alone(module(x[m])[None]), y[m : m + 1], w[m : m + 1], w[m : m + 1].sum(dim=1)).sum().backward()
        for name, p in module.named_parameters():
            grad = stacked[name].grad
            if stacker is StackedMLP:  # [M, in, out] weights, [M, 1, out] biases
                grad = grad.transpose(1, 2) if name.endswith("weight") else grad.squeeze(1)
            torch.testing.assert_close(grad[m], p.grad)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_hand_stacked_mlp_gives_the_fold_scores_of_the_generic_path(house_dir, dropout):
    """The MLP's own stack is an implementation of the same contract: same seeds, same fold scores
    and weights as the torch.func stack of the plain modules. vmap's randomness="different" draws
    the members' dropout masks as one [M, B, H] draw, as the hand-stacked dropout does."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(
        model_kwargs={**NO_DROPOUT_MLP, "dropout": dropout}, max_epochs=4, batch_size=16, lr=1e-2, weight_decay=1e-2
    )
    fast = cross_validate(task, config, datamodule=dm)
    generic = cross_validate(task, config, datamodule=dm, stacking="vmap")
    assert (
        fast.layout.startswith("stacked (hand-stacked MLP") and generic.layout == "stacked (torch.func vmap; asked for)"
    )
    torch.testing.assert_close(torch.tensor(fast.fold_scores), torch.tensor(generic.fold_scores), rtol=1e-5, atol=1e-6)
    fast_state, generic_state = (r.fits[0].module.net.member_state_dict() for r in (fast, generic))
    for name in generic_state:
        torch.testing.assert_close(fast_state[name], generic_state[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stacking", ["auto", "vmap"])
def test_stacked_folds_match_sequential_training(house_dir, stacking):
    """Fold-stacked training equals fitting each fold alone, on the same seeds and batches."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs=NO_DROPOUT_MLP, max_epochs=4, batch_size=16, lr=1e-2, weight_decay=1e-2)
    stacked = cross_validate(task, config, datamodule=dm, stacking=stacking)
    sequential = cross_validate(task, config, datamodule=dm, stacking="sequential")
    assert len(stacked.fits) == 1 and len(sequential.fits) == 3
    torch.testing.assert_close(
        torch.tensor(stacked.fold_scores), torch.tensor(sequential.fold_scores), rtol=1e-5, atol=1e-6
    )
    state = stacked.fits[0].module.net.member_state_dict()
    for position, one in enumerate(sequential.fits):
        for name, value in one.module.net.member_state_dict().items():
            torch.testing.assert_close(state[name][position : position + 1], value, rtol=1e-4, atol=1e-5)


def test_chunked_steps_take_the_automatic_steps(house_dir):
    """A chunk of S mini-batches per Lightning step updates the weights as S automatic steps do,
    a cosine schedule and gradient clipping included."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(
        model_kwargs=NO_DROPOUT_MLP, max_epochs=3, batch_size=16, lr=1e-2, scheduler="cosine", gradient_clip_val=0.5
    )
    chunked = fit(task, config, dm, seed=0)
    automatic = fit(task, config, dm, seed=0, chunked_steps=False)
    assert not chunked.automatic_optimization and automatic.automatic_optimization
    for a, b in zip(chunked.net.parameters(), automatic.net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert chunked.history[-1]["val_rmse"] == pytest.approx(automatic.history[-1]["val_rmse"], rel=1e-4)


class CountsSteps(L.Callback):
    def __init__(self) -> None:
        self.backward = self.optimizer = 0

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.backward += 1

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.optimizer += 1


def test_chunked_steps_go_through_lightnings_hooks_where_the_preset_may_watch_them(house_dir):
    """A preset that hands the Trainer anything (here a ``trainer`` section) gets Lightning's hooks
    and step count for every mini-batch of a chunk; without one, the loss's own backward and the
    optimiser's own step give the same weights bit for bit, clipping and a schedule included."""
    task, dm = house_task_dm(house_dir)
    watched = Task(dataclasses.replace(task.preset, trainer={"enable_model_summary": False}))
    config = TrainConfig(
        model_kwargs=NO_DROPOUT_MLP, max_epochs=2, batch_size=16, lr=1e-2, scheduler="cosine", gradient_clip_val=0.5
    )
    counted, modules = {}, {}
    for name, which in (("plain", task), ("watched", watched)):
        counter = CountsSteps()
        modules[name] = fit(which, config, dm, seed=0, callbacks=[counter])
        counted[name] = (counter.backward, counter.optimizer, modules[name].trainer.global_step)
    steps = config.max_epochs * dm.train_loader(config.batch_size, chunked=True).steps_per_epoch
    assert counted == {"plain": (0, 0, 0), "watched": (steps, steps, steps)}
    for a, b in zip(modules["plain"].net.parameters(), modules["watched"].net.parameters()):
        assert torch.equal(a, b)


def test_an_epochs_last_mini_batch_trains_on_its_rows_only(house_dir, monkeypatch):
    """Padding rows (weight 0) fill the end of an epoch's last mini-batch: each step is cut to the
    rows some member still has, which changes the work and nothing else."""
    task, dm = house_task_dm(house_dir, folds=7)
    sizes = sorted({len(rows) for rows in dm.members.train_rows})
    assert sizes == [51, 52]  # so the cut last step still pads the smaller members
    config = TrainConfig(model_kwargs=NO_DROPOUT_MLP, max_epochs=2, batch_size=16, lr=1e-2, weight_decay=1e-2)
    widths, forward = [], FoldModule.forward

    def spy(self, x):
        if self.training:
            widths.append(x.shape[1])
        return forward(self, x)

    monkeypatch.setattr(FoldModule, "forward", spy)
    stacked = cross_validate(task, config, datamodule=dm)
    assert widths == [16, 16, 16, 4] * 2
    monkeypatch.undo()
    sequential = cross_validate(task, config, datamodule=dm, stacking="sequential")  # the 51-row folds cut to 3
    torch.testing.assert_close(
        torch.tensor(stacked.fold_scores), torch.tensor(sequential.fold_scores), rtol=1e-5, atol=1e-6
    )


def test_first_layer_on_nonzero_entries_matches_the_dense_one():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 20) * (torch.rand(3, 10, 20) < 0.3)
    linears = [nn.Linear(20, 16) for _ in range(3)]
    dense_layer, sparse_layer = StackedLinear(linears), StackedLinear(linears)
    grad = torch.randn(3, 10, 16)
    dense = dense_layer(x)
    index, value = MemberFeatures(x).nonzero
    sparse = sparse_layer(x, (index + row_offsets(3, 20, index), value))
    torch.testing.assert_close(sparse, dense)
    torch.testing.assert_close(dense, torch.stack([layer(x[m]) for m, layer in enumerate(linears)]))
    dense.backward(grad)
    sparse.backward(grad)
    for a, b in zip(dense_layer.parameters(), sparse_layer.parameters()):
        torch.testing.assert_close(b.grad, a.grad)


def test_cv_on_nonzero_entries_matches_dense_features(house_dir, monkeypatch):
    """The real House Prices rows are a third nonzero and train through the nonzero path; the
    miniature's are denser, so the limit is raised here to send them down both paths."""
    config = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, max_epochs=3, batch_size=16, lr=1e-2)
    task, dense_dm = house_task_dm(house_dir)
    assert dense_dm.members.features.nonzero is None  # decided once, here
    monkeypatch.setattr(batches, "SPARSE_DENSITY", 1.0)
    _, sparse_dm = house_task_dm(house_dir)
    assert sparse_dm.members.features.nonzero is not None
    # on a CPU the rule takes the nonzero path; nothing is timed
    monkeypatch.setattr(layout, "_seconds_per_pass", lambda *a, **k: pytest.fail("timed without benchmark"))
    batch = next(iter(sparse_dm.train_loader(16, nonzero=True)))
    assert isinstance(batch["x"], SparseRows)
    dense, sparse = (cross_validate(task, config, datamodule=dm) for dm in (dense_dm, sparse_dm))
    torch.testing.assert_close(torch.tensor(sparse.fold_scores), torch.tensor(dense.fold_scores), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("out_features", [16, 1])
def test_a_stacked_linear_layer_is_each_members_own(out_features):
    """A batched matmul, or for one output a multiply-and-sum: each member's output and gradients are those of
    its own nn.Linear."""
    torch.manual_seed(0)
    x = torch.randn(3, 10, 20)
    linears = [nn.Linear(20, out_features) for _ in range(3)]
    layer = StackedLinear(linears)
    out = layer(x)
    expected = torch.stack([linear(x[m]) for m, linear in enumerate(linears)])
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for m, linear in enumerate(linears):
        torch.testing.assert_close(layer.weight.grad[m], linear.weight.grad.T)
        torch.testing.assert_close(layer.bias.grad[m, 0], linear.bias.grad)


@register_model("test-batchnorm-net")
class BatchNormNet(nn.Module):
    """A model of someone's own that keeps running statistics, which vmap cannot stack."""

    def __init__(self, in_shape, out_features, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_shape[0], width), nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, out_features)
        )

    def forward(self, x):
        return self.net(x)


def test_running_statistics_train_one_fold_after_another_and_stacking_them_is_refused(house_dir):
    """auto trains a BatchNorm model's folds one after another and says why; asking for the
    torch.func stack is refused with what to use instead."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model="test-batchnorm-net", max_epochs=2, batch_size=16)
    message = (
        r"model 'test-batchnorm-net': BatchNorm1d at 'net.1' keeps running statistics, which fold stacking "
        r"\(torch.func.vmap\) cannot batch; use GroupNorm, BatchNorm1d\(..., track_running_stats=False\), "
        r"or --sequential-folds"
    )
    with pytest.raises(StackingError, match=message):
        cross_validate(task, config, datamodule=dm, stacking="vmap")
    auto = cross_validate(task, config, datamodule=dm, stacking="auto")
    assert auto.layout.startswith("sequential (") and "BatchNorm1d at 'net.1' keeps running statistics" in auto.layout
    result = cross_validate(task, config, datamodule=dm, stacking="sequential")  # one fold at a time: no vmap
    assert len(result.fold_scores) == 3 and all(s > 0 for s in result.fold_scores)
    assert auto.fold_scores == result.fold_scores  # the same fits, in the same order


def test_member_gradient_clipping_is_each_members_own():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(3, 4, 5)), nn.Parameter(torch.randn(3, 5))]
    for p, scale in zip(params, (1.0, 10.0)):
        p.grad = torch.randn_like(p) * scale
    alone = [[nn.Parameter(p[m].detach().clone()) for p in params] for m in range(3)]
    for m, member in enumerate(alone):
        for p, stacked in zip(member, params):
            p.grad = stacked.grad[m].clone()
        torch.nn.utils.clip_grad_norm_(member, 1.0)
    clip_member_grad_norm_(params, 1.0)
    for m, member in enumerate(alone):
        for p, stacked in zip(member, params):
            torch.testing.assert_close(stacked.grad[m], p.grad)


def test_configured_gradient_clipping_is_honoured(house_dir):
    """Under SGD a step is proportional to the gradient (AdamW's is not), so clipping shows."""
    task, dm = house_task_dm(house_dir)
    base = dict(model_kwargs=NO_DROPOUT_MLP, max_epochs=2, batch_size=16, lr=1e-2, optimizer="sgd")
    clipped = fit(task, TrainConfig(**base, gradient_clip_val=1e-3), dm, seed=0)
    free = fit(task, TrainConfig(**base), dm, seed=0)
    start = build_module(task, TrainConfig(**base), dm, dm.members, seed=0)
    moved = [
        sum((a - b).abs().max().item() for a, b in zip(m.net.parameters(), start.net.parameters()))
        for m in (clipped, free)
    ]
    assert moved[0] < moved[1] / 10  # each step's norm held to 1e-3: the weights barely move


def test_chunked_steps_refuse_the_trainers_own_clipping(house_dir):
    """A Trainer's own gradient clipping cannot run inside a chunk (Lightning refuses it under manual
    optimisation): refused, never skipped; the configuration's clipping is each member's own."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs=NO_DROPOUT_MLP, max_epochs=1, batch_size=16)
    module = build_module(task, config, dm, dm.members, seed=0)
    loader = dm.train_loader(16, chunked=True)
    with pytest.raises(MisconfigurationException, match="gradient_clip_val"):
        L.Trainer(
            max_epochs=1, gradient_clip_val=1.0, logger=False, enable_progress_bar=False, enable_checkpointing=False
        ).fit(module, loader)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_chunked_steps_train_under_mixed_precision_as_one_mini_batch_per_step(house_dir, precision):
    """Chunks go through Lightning's manual optimisation (manual_backward, the optimiser it hands
    out), so its precision plugin autocasts, scales and unscales them as it does automatic steps:
    the same fit, a clipped one, to the same scores within bfloat16's noise (on a CPU Lightning
    runs 16-mixed as bf16-mixed)."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(
        model_kwargs={"hidden_sizes": (16,), "dropout": 0.0},
        max_epochs=4,
        batch_size=16,
        lr=1e-2,
        gradient_clip_val=0.5,
        precision=precision,
    )
    chunked = fit(task, config, dm, seed=0)
    automatic = fit(task, config, dm, seed=0, chunked_steps=False)
    assert not chunked.automatic_optimization and automatic.automatic_optimization
    scores, expected = (torch.tensor(m.history[-1]["val_rmse"]) for m in (chunked, automatic))
    assert torch.isfinite(scores).all() and (scores < 1.0).all()
    torch.testing.assert_close(scores, expected, rtol=0.05, atol=0.0)


def test_fold_layout_follows_its_rule_or_is_measured_once_with_benchmark_and_says_why(monkeypatch):
    calls = []

    def timed(stack, x, steps=3):
        calls.append(len(x))
        return {3: 1.0, 1: 0.5}[len(x)]  # stacked 1.0 s a step against 3 x 0.5 s

    monkeypatch.setattr(layout, "_seconds_per_step", timed)
    monkeypatch.setattr(layout, "_MEASURED", {})

    def make(count):
        return [nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 2)) for _ in range(count)]

    def choose(benchmark=True):
        return choose_layout(make, "tiny-conv", ("tiny-conv",), (1, 8, 8), 16, 3, torch.device("cpu"), benchmark)

    assert choose(benchmark=False).reason == "Conv2d at '0' on a CPU, where stacked convolutions are slower"
    assert calls == []  # the rule times nothing
    first = choose()
    assert (
        first.stacked
        and first.reason == "benchmark: measured on cpu: 1000 ms per step stacked, 1500 ms one after another"
    )
    assert choose() is first and calls == [3, 1]  # measured once
    assert (
        choose_layout(make, "tiny-conv", ("tiny-conv",), (1, 8, 8), 16, 1, torch.device("cpu")).reason == "one member"
    )
    assert choose_layout(lambda n: mlps(n), "mlp", ("mlp",), (4,), 16, 3, torch.device("cpu")).reason == "hand-stacked"


def test_vmap_or_sequential_cnn_folds_give_the_same_scores(tmp_path):
    """The measured choice only changes the speed: a CNN's folds stacked with vmap and trained one
    after another end with the same validation scores."""
    write_idx_set(tmp_path / "fashion-mnist", n_train=120, n_test=20)
    task = get_task("fashion-mnist")
    dm = task.datamodule(data_dir=tmp_path, n_folds=2, fold=[0, 1])
    dm.setup()
    small = {"channels": (4, 8), "hidden": 16, "dropout": 0.0, "convs": 1, "norm": "group"}  # GroupNorm stacks
    config = task.config(
        "cnn", max_epochs=2, batch_size=16, precision="32-true", channels_last=False, model_kwargs=small
    )
    stacked = cross_validate(task, config, datamodule=dm, stacking="vmap")
    sequential = cross_validate(task, config, datamodule=dm, stacking="sequential")
    torch.testing.assert_close(
        torch.tensor(stacked.fold_scores), torch.tensor(sequential.fold_scores), atol=1e-6, rtol=0
    )


def test_channels_last_keeps_each_members_convolutions_channels_last_and_the_arithmetic(tmp_path):
    """``channels_last``: every member's convolution weights stay channels-last through stacking
    and training, and the fit is the same up to the order of sums."""
    write_idx_set(tmp_path / "fashion-mnist", n_train=120, n_test=20)
    task = get_task("fashion-mnist")
    dm = task.datamodule(data_dir=tmp_path, n_folds=2, fold=[0, 1])
    dm.setup()
    model = {"channels": (4, 8), "hidden": 16, "dropout": 0.0, "convs": 2, "norm": "batch"}
    config = task.config(
        "cnn", max_epochs=2, batch_size=16, precision="32-true", channels_last=False, model_kwargs=model
    )
    plain = cross_validate(task, config, datamodule=dm)
    nhwc = cross_validate(task, dataclasses.replace(config, channels_last=True), datamodule=dm)
    for result, channels_last in ((plain, False), (nhwc, True)):
        for fitted in result.fits:
            weights = [p for p in fitted.module.net.parameters() if p.dim() == 5 and p.shape[2] > 1]
            assert len(weights) == 3  # the convolutions after the first, of more than one input channel
            for weight in weights:
                assert weight[0].is_contiguous(memory_format=torch.channels_last) is channels_last
    losses = [[h["train_loss"] for h in fold] for fold in plain.history]
    nhwc_losses = [[h["train_loss"] for h in fold] for fold in nhwc.history]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(nhwc_losses), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(plain.fold_scores), torch.tensor(nhwc.fold_scores), atol=0.02, rtol=0)


def test_build_stack_chooses_the_hand_stacked_form_where_registered():
    assert isinstance(build_stack(mlps(2), "mlp"), StackedMLP)
    assert isinstance(build_stack(mlps(2), "mlp", hand_stacked=False), MemberStack)
    assert isinstance(build_stack([nn.Linear(2, 1), nn.Linear(2, 1)], "linear"), MemberStack)


def test_fused_adamw_takes_torchs_steps_exactly():
    """Same update as torch.optim.AdamW(fused=True), bit for bit: two parameter groups, a learning
    rate schedule, a step where one parameter has no gradient, and a reload mid-way."""
    torch.manual_seed(0)
    start = [torch.randn(3, 4), torch.randn(4), torch.randn(2, 3)]

    def run(make, reload_at=None):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1:2], "weight_decay": 0.0}]
        optimizer = make(groups)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)
        for step in range(6):
            if step == reload_at:
                state = optimizer.state_dict()
                optimizer = make(groups)
                optimizer.load_state_dict(state)
                schedule.optimizer = optimizer
            optimizer.zero_grad()
            loss = sum((p * (k + 1)).sin().sum() for k, p in enumerate(params) if not (step == 2 and k == 1))
            loss.backward()
            optimizer.step()
            schedule.step()
        return params, optimizer

    torch_params, torch_optimizer = run(lambda g: torch.optim.AdamW(g, lr=0.1, fused=True))
    for reload_at in (None, 4):
        params, optimizer = run(lambda g: FusedAdamW(g, lr=0.1), reload_at)
        for a, b in zip(params, torch_params):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        for a, b in zip(optimizer.state.values(), torch_optimizer.state.values()):
            assert all(torch.equal(a[key], b[key]) for key in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimisers_under_a_grad_scaler_skip_a_non_finite_step_and_are_unscaled_before_clipping(name):
    """16-bit mixed precision, as Lightning drives it: the scaler unscales the gradients before they
    are clipped, and a step with infinite gradients is skipped. The project's fused optimisers end
    where torch's plain (unfused) ones do, with no NaN."""
    from lightning.pytorch.plugins.precision.amp import _optimizer_handles_unscaling

    from project.engine.optim import create_optimizer

    torch.manual_seed(0)
    start, slope = torch.randn(4, 3), torch.arange(12.0).reshape(4, 3)

    def run(make):
        weight = torch.nn.Parameter(start.clone())
        optimizer = make([{"params": [weight], "weight_decay": 0.01}])
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        unscaled = []
        for bad in (False, True, False, False):
            optimizer.zero_grad()
            loss = (weight * slope).sum() ** 2 / 100 * (float("inf") if bad else 1.0)
            scaler.scale(loss).backward()
            if not _optimizer_handles_unscaling(optimizer):  # as Lightning's MixedPrecision does
                scaler.unscale_(optimizer)
            unscaled.append(weight.grad.clone())  # what Lightning's clipping sees
            scaler.step(optimizer)
            scaler.update()
        return weight.detach(), unscaled

    plain = {
        "adamw": lambda g: torch.optim.AdamW(g, lr=0.1, fused=False),
        "sgd": lambda g: torch.optim.SGD(g, lr=0.01, momentum=0.9, fused=False),
    }[name]
    ours = (
        (lambda g: create_optimizer(name, g, lr=0.1))
        if name == "adamw"
        else (lambda g: create_optimizer(name, g, lr=0.01, momentum=0.9))
    )
    weight, grads = run(ours)
    expected_weight, expected_grads = run(plain)
    assert torch.isfinite(weight).all()
    torch.testing.assert_close(weight, expected_weight, rtol=1e-5, atol=1e-6)
    for got, expected in zip(grads[:1] + grads[2:], expected_grads[:1] + expected_grads[2:]):
        torch.testing.assert_close(got, expected)  # unscaled: the loss's own gradients
    torch.testing.assert_close(grads[0], 2 * (start * slope).sum() / 100 * slope)


def test_the_first_layers_nonzero_trick_follows_its_rule_or_is_measured_with_benchmark_and_said(house_dir, monkeypatch):
    """Summing the weight rows of each row's nonzero entries beat the dense matmul on a CPU's cores,
    and it sums in another order: by default a rule takes it on a CPU, untimed. With benchmark the
    engine times both where the fit trains, takes the faster, says which, and measures once per
    model, arguments, shape and device."""
    monkeypatch.setattr(batches, "SPARSE_DENSITY", 1.0)
    monkeypatch.setattr(layout, "_FIRST_LAYER", {})
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs={"hidden_sizes": (16,)}, max_epochs=2, batch_size=16)
    monkeypatch.setattr(layout, "_seconds_per_pass", lambda *a, **k: pytest.fail("timed without benchmark"))
    assert "first layer on nonzero entries, on a CPU)" in cross_validate(task, config, datamodule=dm).layout
    monkeypatch.setattr(task.preset, "benchmark", True)  # the task is shared: get_task caches it
    timed, loaders = [], []
    original = dm.train_loader
    monkeypatch.setattr(dm, "train_loader", lambda *a, **k: loaders.append(k.get("nonzero")) or original(*a, **k))
    for sparse_slower, said in ((True, "first layer dense"), (False, "first layer on nonzero entries")):
        layout._FIRST_LAYER.clear()
        monkeypatch.setattr(
            layout,
            "_seconds_per_pass",
            lambda stack, x, passes=5, slower=sparse_slower: (
                timed.append(x) or (2.0 if isinstance(x, SparseRows) == slower else 1.0)
            ),
        )
        result = cross_validate(task, config, datamodule=dm)
        assert f"{said}, benchmark: measured on cpu: " in result.layout, result.layout
        assert loaders[-1] is (not sparse_slower)  # what the members trained on
    measured = len(timed)
    cross_validate(task, config, datamodule=dm)
    assert len(timed) == measured  # the answer is reused


@register_model("test-layernorm-net")
class LayerNormNet(nn.Module):
    """A model of someone's own that torch.func stacks: no hand-stacked form, so the layout's rule
    (or, asked for, its timing) decides how its folds train."""

    def __init__(self, in_shape, out_features, width: int = 16, dropout: float = 0.2) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(in_shape), width),
            nn.LayerNorm(width),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(width, out_features),
        )

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("benchmark", [False, True])
def test_only_benchmark_lets_a_stopwatch_choose_the_arithmetic(house_dir, monkeypatch, benchmark):
    """Stacked and sequential folds give the same scores but not the same last digits. By default
    no timing is consulted, so whichever way a timer would lean the fold scores are identical to the
    last digit; with benchmark the timer decides and the layout (which the runs record) says so."""
    task, dm = house_task_dm(house_dir)
    monkeypatch.setattr(task.preset, "benchmark", benchmark)  # the task is shared: get_task caches it
    config = TrainConfig(model="test-layernorm-net", max_epochs=3, batch_size=16, lr=1e-2)
    timed, results = [], {}
    for stacked_faster in (True, False):
        monkeypatch.setattr(layout, "_MEASURED", {})

        def timer(stack, x, steps=3, faster=stacked_faster):
            timed.append(len(x))
            return (1.0 if faster else 9.0) if len(x) > 1 else 1.0  # a step of the stack, or of one member

        monkeypatch.setattr(layout, "_seconds_per_step", timer)
        results[stacked_faster] = cross_validate(task, config, datamodule=dm)
    if benchmark:
        assert timed and [len(r.fits) for r in results.values()] == [1, 3]
        assert "benchmark: measured on cpu" in results[True].layout, results[True].layout
        assert "benchmark: measured on cpu" in results[False].layout
    else:
        assert (
            timed == []
            and results[True].layout == results[False].layout == "stacked (torch.func vmap; stacked by default)"
        )
        assert results[True].fold_scores == results[False].fold_scores  # to the last digit


def test_probing_and_timing_leave_the_random_stream_where_it_was(house_dir, monkeypatch):
    """The layout and the first layer are chosen before the fit seeds its generators, but a caller's
    stream (the sweep's, a notebook's) must not move: the probe's and the timings' dropout draws
    happen on a forked generator."""
    monkeypatch.setattr(batches, "SPARSE_DENSITY", 1.0)
    monkeypatch.setattr(layout, "_FIRST_LAYER", {})
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model="test-layernorm-net", max_epochs=1, batch_size=16)
    mlp = TrainConfig(model_kwargs={"hidden_sizes": (16,), "dropout": 0.3})
    for benchmark in (False, True):
        monkeypatch.setattr(task.preset, "benchmark", benchmark)
        state = torch.get_rng_state()
        assert fold_layout(task, config, dm, members=3, seed=0).stacked in (True, False)
        assert first_layer(task, mlp, dm, dm.members, seed=0) is not None  # timed for real with benchmark
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("embedding", ["periodic", "plr"])
def test_a_numeric_embedding_is_each_members_own_and_stacks_like_sequential_folds(house_dir, embedding):
    """The MLP's numeric embedding trains under the generic stack (the hand-stacked MLP does not
    hold it): each fold member draws its own frequencies, and the stacked fit equals fitting each
    fold alone; weight decay leaves the frequencies alone."""
    task, dm = house_task_dm(house_dir)
    kwargs = {**NO_DROPOUT_MLP, "numeric_embedding": embedding, "embedding_frequencies": 4, "embedding_dim": 3}
    config = TrainConfig(model_kwargs=kwargs, max_epochs=3, batch_size=16, lr=1e-2, weight_decay=1e-2)
    auto = cross_validate(task, config, datamodule=dm)  # stacked or not as measured, never hand-stacked
    assert "(torch.func vmap" in auto.layout and "hand-stacked" not in auto.layout
    stacked = cross_validate(task, config, datamodule=dm, stacking="vmap")
    sequential = cross_validate(task, config, datamodule=dm, stacking="sequential")
    torch.testing.assert_close(
        torch.tensor(stacked.fold_scores), torch.tensor(sequential.fold_scores), rtol=1e-5, atol=1e-6
    )
    frequencies = stacked.fits[0].module.net.member_state_dict()["layers.1.frequencies"]
    assert frequencies.shape == (3, dm.n_features, 4)
    assert not torch.allclose(frequencies[0], frequencies[1])  # each member its own draw
    groups = stacked.fits[0].module.net.param_groups(0.5)
    decayed = {id(p) for p in groups[0]["params"]}
    assert (
        groups[0]["weight_decay"] == 0.5 and id(stacked.fits[0].module.net.module.layers[1].frequencies) not in decayed
    )
