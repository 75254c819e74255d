"""The MLP, the LightningModules and the K-fold runner, on the real configuration shrunk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from project.cv import TrainingDiverged, cross_validate
from project.data import FashionMNISTDataModule, batches
from project.data.batches import MemberFeatures
from project.models import MLP, MLPClassifier, MLPRegressor
from project.models.mlp import StackedLinear, nonzero_rows
from project.models.optim import FusedAdamW
from project.tasks import TrainConfig, get_task
from tests.conftest import write_idx_set


def test_mlp_shapes_and_linear_special_case():
    net = MLP(7, 3, (16, 8), dropout=[0.1, 0.2], members=4)
    assert net(torch.randn(4, 5, 7)).shape == (4, 5, 3)
    linear = MLP(7, 1, ())
    assert [type(m) for m in linear.layers] == [StackedLinear]
    x = torch.randn(1, 5, 7)
    layer = linear.layers[0]
    torch.testing.assert_close(linear(x), x @ layer.weight + layer.bias)


def test_regressor_members_start_from_their_training_mean(house_dir):
    """Before any step each member predicts its own training rows' mean target (log price ~ 12)."""
    task, dm = house_task_dm(house_dir)
    module = cross_validate(task, TrainConfig(hidden_sizes=(8,), max_epochs=1, lr=1e-9, linear_skip=True),
                            datamodule=dm).modules[0]
    means = torch.stack([dm.targets[rows].mean() for rows in dm.train_rows])
    torch.testing.assert_close(module.net.layers[-1].bias.reshape(-1), means, atol=1e-5, rtol=0)
    assert module.net.skip.bias.abs().max() < 1e-5


def test_epoch_metrics_reach_lightning_callbacks_without_a_logger(house_dir):
    """EarlyStopping reads val/rmse from callback_metrics: here it stops after the first epoch."""
    from lightning.pytorch.callbacks import EarlyStopping

    task, dm = house_task_dm(house_dir)
    stop = EarlyStopping(monitor="val/rmse", stopping_threshold=100.0)
    result = cross_validate(task, TrainConfig(hidden_sizes=(8,), max_epochs=5), datamodule=dm, callbacks=[stop])
    assert len(result.history[0]) == 1 and stop.stopped_epoch == 0


def test_linear_skip_adds_a_linear_path():
    net = MLP(7, 1, (16,), members=2, linear_skip=True)
    x = torch.randn(2, 5, 7)
    torch.testing.assert_close(net(x), net.layers(x) + x @ net.skip.weight + net.skip.bias)
    assert MLP(7, 1, (), linear_skip=True).skip is None  # a linear model is its own linear path


def test_member_initialisation_does_not_depend_on_its_neighbours():
    stacked = MLP(5, 1, (4,), members=3, seed=2, member_ids=[0, 1, 2])
    alone = MLP(5, 1, (4,), members=1, seed=2, member_ids=[2])
    for a, b in zip(stacked.parameters(), alone.parameters()):
        torch.testing.assert_close(a[2:], b)


class TinyImages(FashionMNISTDataModule):
    dataset = "tiny-images"  # no pinned checksums: read as it is


def test_refit_ensemble_scores_averaged_probabilities(tmp_path):
    """The final refit trains the task's ensemble of seeds at once and scores their average once."""
    from project.final import refit_and_test, test_metrics

    assert get_task("fashion-mnist").ensemble == 3
    write_idx_set(tmp_path / "tiny-images")
    task = dataclasses.replace(get_task("fashion-mnist"), datamodule=TinyImages)
    config = TrainConfig(hidden_sizes=(16,), max_epochs=2, batch_size=32)
    module, scores = refit_and_test(task, config, tmp_path, seed=0, predictions_path=tmp_path / "p.csv")
    weights = module.net.layers[0].weight
    assert weights.shape[0] == 3 and not torch.equal(weights[0], weights[1])  # own initialisation each
    assert len(scores["test_accuracy_members"]) == 3 and 0 <= scores["test_accuracy"] <= 1
    assert list(test_metrics(scores)) == ["test_accuracy", "test_accuracy_seed0", "test_accuracy_seed1",
                                          "test_accuracy_seed2"]
    dm = task.datamodule(data_dir=tmp_path, fold=None, replicas=3)
    dm.setup()
    module.eval()
    with torch.no_grad():
        logits = module(dm.test_features.gather(torch.arange(dm.test_size).expand(3, -1)))
    expected = (logits.softmax(-1).mean(0).argmax(-1) == dm.test_targets).double().mean().item()
    assert scores["test_accuracy"] == pytest.approx(expected)
    labels = (tmp_path / "p.csv").read_text().splitlines()
    assert labels[0] == "id,label" and len(labels) == dm.test_size + 1


@pytest.mark.parametrize("bad, message", [
    ({"dropout": 1.0}, r"dropout 1.0 is outside \[0, 1\)"),
    ({"activation": "nope"}, "activation 'nope' is unknown"),
])
def test_mlp_refuses_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        MLP(3, 1, (4,), **bad)


def test_member_gradients_are_independent():
    """The summed loss gives each member exactly the gradient it gets alone."""
    torch.manual_seed(0)
    x, y, w = torch.randn(3, 8, 4), torch.randn(3, 8), torch.ones(3, 8)
    w[2, 5:] = 0
    stacked = MLPRegressor(MLP(4, 1, (6,), members=3, member_ids=[0, 1, 2]))
    stacked.member_loss(stacked(x), y, w).sum().backward()
    for m in range(3):
        alone = MLPRegressor(MLP(4, 1, (6,), members=1, member_ids=[m]))
        alone.member_loss(alone(x[m : m + 1]), y[m : m + 1], w[m : m + 1]).sum().backward()
        for p_stacked, p_alone in zip(stacked.parameters(), alone.parameters()):
            torch.testing.assert_close(p_stacked.grad[m : m + 1], p_alone.grad)


def test_classifier_step_and_metric():
    module = MLPClassifier(MLP(4, 3, (8,), members=2))
    logits = module(torch.randn(2, 6, 4))
    assert logits.shape == (2, 6, 3)
    module.val_metric.update(torch.eye(3)[None].repeat(2, 2, 1), torch.tensor([[0, 1, 2, 0, 1, 2], [0, 0, 0, 0, 1, 2]]),
                             torch.ones(2, 6))
    assert module.val_metric.compute().tolist() == pytest.approx([1.0, 4 / 6])


def house_task_dm(data_dir, folds=3, **kwargs):
    task = get_task("house-prices")
    dm = task.datamodule(data_dir=data_dir, n_folds=folds, fold=list(range(folds)), **kwargs)
    dm.setup()
    return task, dm


def test_batched_folds_match_sequential_training(house_dir):
    """Fold-stacked training equals fitting each fold alone, on the same seeds and batches."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(hidden_sizes=(16,), max_epochs=4, batch_size=16, lr=1e-2, weight_decay=1e-2)
    batched = cross_validate(task, config, datamodule=dm, batched=True)
    sequential = cross_validate(task, config, datamodule=dm, batched=False)
    assert len(batched.modules) == 1 and len(sequential.modules) == 3
    torch.testing.assert_close(torch.tensor(batched.fold_scores), torch.tensor(sequential.fold_scores), rtol=1e-5, atol=1e-6)
    for position in range(3):
        for p_batched, p_alone in zip(batched.modules[0].net.parameters(), sequential.modules[position].net.parameters()):
            torch.testing.assert_close(p_batched[position : position + 1], p_alone, rtol=1e-4, atol=1e-5)


def test_an_epochs_last_mini_batch_trains_on_its_rows_only(house_dir, monkeypatch):
    """Padding rows (weight 0) fill the end of an epoch's last mini-batch: each step is cut to the
    rows some member still has, which changes the work and nothing else."""
    task, dm = house_task_dm(house_dir, folds=7)
    sizes = sorted({len(rows) for rows in dm.train_rows})
    assert sizes == [51, 52]  # so the cut last step still pads the smaller members
    config = TrainConfig(hidden_sizes=(16,), max_epochs=2, batch_size=16, lr=1e-2, weight_decay=1e-2)
    widths, forward = [], MLPRegressor.forward

    def spy(self, x, nonzero=None):
        if self.training:
            widths.append(x.shape[1])
        return forward(self, x, nonzero)

    monkeypatch.setattr(MLPRegressor, "forward", spy)
    batched = cross_validate(task, config, datamodule=dm)
    assert widths == [16, 16, 16, 4] * 2
    monkeypatch.undo()
    sequential = cross_validate(task, config, datamodule=dm, batched=False)  # alone, the 51-row folds cut to 3
    torch.testing.assert_close(torch.tensor(batched.fold_scores), torch.tensor(sequential.fold_scores), rtol=1e-5, atol=1e-6)


def test_same_seed_same_cv_score(house_dir):
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(hidden_sizes=(16,), dropout=0.3, max_epochs=3, batch_size=8)
    first = cross_validate(task, config, datamodule=dm, seed=0)
    second = cross_validate(task, config, datamodule=dm, seed=0)
    assert len(first.fold_scores) == 3 and all(s > 0 for s in first.fold_scores)
    assert abs(first.mean - second.mean) < 1e-6
    assert len(first.history[0]) == 3 and {"train_loss", "val_rmse"} <= set(first.history[0][0])


def test_divergence_names_fold_and_epoch(house_dir):
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(hidden_sizes=(16,), max_epochs=50, batch_size=8, lr=1e4, optimizer="sgd")
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite on fold \d at epoch \d+"):
        cross_validate(task, config, datamodule=dm)


def test_classification_cv(idx_dir):
    task = get_task("fashion-mnist")
    dm = task.datamodule(data_dir=idx_dir, n_folds=2, fold=[0, 1], batch_size=32)
    dm.setup()
    result = cross_validate(task, TrainConfig(hidden_sizes=(32,), max_epochs=2, batch_size=32), datamodule=dm)
    assert len(result.fold_scores) == 2 and all(0 <= s <= 1 for s in result.fold_scores)


@pytest.mark.parametrize("bad, message", [
    ({"lr": -1.0}, "lr=-1.0 is invalid"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 is invalid"),
    ({"dropout": 1.5}, "dropout=1.5 is invalid"),
    ({"max_epochs": 0}, "max_epochs=0 is invalid"),
])
def test_config_refuses_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_single_member_scores_stay_lists(house_dir):
    """One member (one validation fold, or sequential folds) keeps per-member lists in the history."""
    task, dm = house_task_dm(house_dir)
    result = cross_validate(task, TrainConfig(hidden_sizes=(8,), max_epochs=2, batch_size=16), datamodule=dm, batched=False)
    assert len(result.fold_scores) == 3 and all(isinstance(s, float) for s in result.fold_scores)
    assert all(isinstance(r["val_rmse"], float) for h in result.history for r in h)
    # the module's own record keeps one value per member, as the pruning callback reads it
    assert [len(r["val_rmse"]) for r in result.modules[0].history] == [1, 1]


def test_saved_model_reloads_with_weights_only(house_dir, tmp_path):
    from project.final import load_model, save_model

    task, dm = house_task_dm(house_dir)
    config = TrainConfig(hidden_sizes=(8,), max_epochs=2, batch_size=16)
    result = cross_validate(task, config, datamodule=dm)
    path = save_model(result.modules[0], config, dm.n_features, tmp_path / "model.pt")
    net, loaded_config, saved = load_model(path)
    assert loaded_config == config and saved["fold_ids"] == [0, 1, 2]
    x = dm.test_features.x
    torch.testing.assert_close(net(x), result.modules[0].net.eval()(x))


def test_own_csv_task_as_the_readme_shows(tmp_path):
    """The README's recipe for a CSV task of one's own: subclass, register, cross-validate."""
    from project.data import HousePricesDataModule, TabularSpec
    from project.tasks import TASKS, Task

    from .conftest import make_house_frames

    train, test = make_house_frames()
    folder = tmp_path / "my-task"
    folder.mkdir()
    train.rename(columns={"Id": "id", "SalePrice": "price"}).to_csv(folder / "train.csv", index=False)
    test.rename(columns={"Id": "id"}).to_csv(folder / "test.csv", index=False)

    class MyData(HousePricesDataModule):
        dataset = "my-task"

    TASKS["my-task"] = Task("my-task", MyData, "regression", "rmse", "minimize", 1,
                            {"spec": TabularSpec(id_column="id", target="price")})
    try:
        task = get_task("my-task")
        result = cross_validate(task, TrainConfig(hidden_sizes=(8,), max_epochs=2, batch_size=16),
                                data_dir=str(tmp_path), n_folds=3)
        assert len(result.fold_scores) == 3 and all(s > 0 for s in result.fold_scores)
    finally:
        del TASKS["my-task"]


def test_first_layer_on_nonzero_entries_matches_the_dense_one():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 20) * (torch.rand(3, 10, 20) < 0.3)
    features = MemberFeatures(x)
    layers = [StackedLinear(20, 16, [1, 2, 3]) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    grad = torch.randn(3, 10, 16)
    dense = layers[0](x)
    index, value = features.nonzero
    sparse = layers[1](x, (nonzero_rows(index, 20), value))
    torch.testing.assert_close(sparse, dense)
    dense.backward(grad)
    sparse.backward(grad)
    for a, b in zip(layers[0].parameters(), layers[1].parameters()):
        torch.testing.assert_close(b.grad, a.grad)


def test_cv_on_nonzero_entries_matches_dense_features(house_dir, monkeypatch):
    """The real House Prices rows are a third nonzero and train through the nonzero path; the
    miniature's are denser, so the limit is raised here to send them down both paths."""
    config = TrainConfig(hidden_sizes=(16,), max_epochs=3, batch_size=16, lr=1e-2)
    task, dense_dm = house_task_dm(house_dir)
    assert dense_dm.features.nonzero is None  # decided once, here
    monkeypatch.setattr(batches, "SPARSE_DENSITY", 1.0)
    _, sparse_dm = house_task_dm(house_dir)
    assert sparse_dm.features.nonzero is not None
    dense, sparse = (cross_validate(task, config, datamodule=dm) for dm in (dense_dm, sparse_dm))
    torch.testing.assert_close(torch.tensor(sparse.fold_scores), torch.tensor(dense.fold_scores), rtol=1e-4, atol=1e-6)


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
