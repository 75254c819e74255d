"""The plain models, the registry, the heads and saved models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from project.artifacts.model_io import load_model
from project.artifacts.predictor import Predictor
from project.config import TrainConfig
from project.cv import cross_validate
from project.engine import ClassificationHead, RegressionHead
from project.engine.metrics import StackedAccuracy
from project.models import CNN, MLP, create_model
from project.models.registry import MODELS, register_model
from project.tasks import get_task
from project.validate import check_config
from tests.conftest import house_task_dm


def test_mlp_is_the_plain_d2l_module():
    net = MLP((7,), 3, (16, 8), dropout=[0.1, 0.2])
    assert net(torch.randn(5, 7)).shape == (5, 3)
    linear = MLP((7,), 1, ())
    assert [type(m) for m in linear.layers] == [nn.Flatten, nn.Linear]
    x = torch.randn(5, 7)
    torch.testing.assert_close(linear(x), x @ linear.layers[1].weight.T + linear.layers[1].bias)
    images = MLP((1, 28, 28), 10, (32,))
    assert images(torch.randn(4, 1, 28, 28)).shape == (4, 10)  # flattened


def test_linear_skip_adds_a_linear_path():
    net = MLP((7,), 1, (16,), linear_skip=True)
    x = torch.randn(5, 7)
    torch.testing.assert_close(net(x), net.layers(x) + net.skip(x))
    assert MLP((7,), 1, (), linear_skip=True).skip is None  # a linear model is its own linear path


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"dropout": 1.0}, r"dropout 1.0 is outside \[0, 1\)"),
        ({"activation": "nope"}, "activation 'nope' is unknown"),
    ],
)
def test_mlp_refuses_bad_arguments(bad, message):
    with pytest.raises(ValueError, match=message):
        MLP((3,), 1, (4,), **bad)


def test_cnn_blocks_of_several_convolutions_and_batch_norm():
    """``convs`` 3x3 convolutions a block, GroupNorm or BatchNorm after each; the default keeps
    one block of one convolution per entry, with the same parameter names as ever (saved models)."""
    plain = CNN((1, 28, 28), 10, channels=(8, 16), hidden=32)
    assert [k for k in plain.state_dict() if k.startswith("features")] == [
        f"features.{i}.{p}" for i in (0, 1, 4, 5) for p in ("weight", "bias")
    ]
    deep = CNN((1, 28, 28), 10, channels=(8, 16), hidden=32, convs=2, norm="batch")
    assert sum(isinstance(m, torch.nn.Conv2d) for m in deep.modules()) == 4
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in deep.modules()) == 4
    assert deep(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="norm 'layer': expected one of group, batch"):
        CNN((1, 28, 28), 10, norm="layer")


def test_cnn_takes_images_and_refuses_table_rows():
    net = CNN((1, 28, 28), 10, channels=(8, 16), hidden=32)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert CNN((3, 32, 32), 5, channels=(8,))(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError, match=r"in_shape \(257,\): the CNN takes images"):
        CNN((257,), 1)


def test_registry_creates_by_name_and_names_bad_arguments():
    assert set(MODELS) >= {"mlp", "cnn"}
    assert isinstance(create_model("mlp", (4,), 1, hidden_sizes=(3,)), MLP)
    with pytest.raises(ValueError, match=r"model 'nope' is unknown: expected one of .*cnn.*mlp"):
        create_model("nope", (4,), 1)
    with pytest.raises(ValueError, match=r"model 'mlp' takes no argument 'channels': expected some of hidden_sizes"):
        check_config(TrainConfig(model="mlp", model_kwargs={"channels": (8,)}))
    with pytest.raises(ValueError, match="registered already"):
        register_model("mlp")(CNN)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"lr": -1.0}, "lr=-1.0 is invalid"),
        ({"weight_decay": -0.1}, "weight_decay=-0.1 is invalid"),
        ({"max_epochs": 0}, "max_epochs=0 is invalid"),
        ({"optimizer": "adam"}, "optimizer='adam' is invalid: expected one of adamw, sgd"),
        ({"precision": "8-bit"}, "precision='8-bit' is invalid"),
        ({"gradient_clip_val": 0.0}, "gradient_clip_val=0.0 is invalid"),
    ],
)
def test_config_refuses_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_task_config_is_per_model():
    task = get_task("fashion-mnist")
    assert task.default_model == "cnn" and task.config().model_kwargs["channels"] == (24, 48)
    assert task.config("mlp").model_kwargs["hidden_sizes"] == (256, 256)
    cnn = task.config("cnn", lr=0.01, model_kwargs={"dropout": 0.4})
    assert cnn.model == "cnn" and cnn.lr == 0.01 and cnn.model_kwargs["dropout"] == 0.4
    assert cnn.model_kwargs["channels"] == (24, 48)  # the CNN's default, kept beside the override
    assert TrainConfig(model_kwargs={"hidden_sizes": [4, 2]}).flat()["model.hidden_sizes"] == (4, 2)


def test_regression_head_predicts_relative_to_each_members_training_mean(house_dir):
    """Each member's output starts at its own training rows' mean target (log price ~ 12)."""
    task, dm = house_task_dm(house_dir)
    module = (
        cross_validate(task, TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=1, lr=1e-9), datamodule=dm)
        .fits[0]
        .module
    )
    means = torch.stack([dm.targets[rows].mean() for rows in dm.members.train_rows])
    torch.testing.assert_close(module.head.offset[:, 0], means)
    head = RegressionHead(2, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(head(torch.zeros(2, 3, 1)), torch.tensor([[1.0] * 3, [2.0] * 3]))


def test_heads_average_the_loss_over_each_members_own_rows():
    weight = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # member 1 has one row, then padding
    head = RegressionHead(2, loss="mse")
    rows = weight.sum(dim=1)
    loss = head.loss(torch.zeros(2, 3), torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]]), weight, rows)
    torch.testing.assert_close(loss, torch.tensor([5.0, 4.0]))
    logits = torch.zeros(2, 3, 4)
    torch.testing.assert_close(
        ClassificationHead(2).loss(logits, torch.zeros(2, 3, dtype=torch.long), weight, rows),
        torch.full((2,), torch.log(torch.tensor(4.0)).item()),
    )


def test_stacked_accuracy_keeps_one_score_per_member():
    metric = StackedAccuracy(2)
    metric.update(
        torch.eye(3)[None].repeat(2, 2, 1), torch.tensor([[0, 1, 2, 0, 1, 2], [0, 0, 0, 0, 1, 2]]), torch.ones(2, 6)
    )
    assert metric.compute().tolist() == pytest.approx([1.0, 4 / 6])


def test_a_saved_predictor_reloads_by_name_without_pickles(house_dir, tmp_path):
    """The saved folder records the model's name and arguments, the members' plain weights and
    their fitted preprocessing: it reloads through the registry alone (weights_only, skops with a
    list of trusted types) and predicts from raw rows what the trained stack predicted."""
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs={"hidden_sizes": (8,), "linear_skip": True}, max_epochs=2, batch_size=16)
    result = cross_validate(task, config, datamodule=dm)
    predictor = Predictor.from_fits(task, config, result.fits, dm)
    folder = predictor.save(tmp_path / "model")
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == [
        "inputs.json",
        "member0.skops",
        "member1.skops",
        "member2.skops",
        "model.pt",
        "task.yaml",
    ]
    members, loaded_config, saved = load_model(folder / "model.pt")
    assert loaded_config == config and saved["folds"] == [0, 1, 2] and all(isinstance(m, MLP) for m in members)
    module = result.fits[0].module.eval()
    with torch.no_grad():
        expected = module(dm.members.test_features.x)  # [M, N]: the stack on the DataModule's test features
    raw = pd.read_csv(house_dir / "house-prices" / "test.csv")
    torch.testing.assert_close(Predictor.load(folder).member_outputs(raw), expected, rtol=1e-6, atol=1e-6)
    frame = Predictor.load(folder).predict(raw)
    assert list(frame.columns) == ["Id", "SalePrice"] and frame["Id"].tolist() == raw["Id"].tolist()
    np.testing.assert_allclose(frame["SalePrice"], np.exp(expected.double().mean(0).numpy()), rtol=1e-6)


def test_the_public_api_is_importable_from_the_package():
    import project

    for name in project.__all__:
        assert getattr(project, name) is not None, name
    from project import PlainModule, cross_validate, get_task  # noqa: F401

    with pytest.raises(AttributeError, match="its public names are"):
        project.nope  # noqa: B018


def test_a_saved_predictor_with_a_numeric_embedding_predicts_as_it_trained(house_dir, tmp_path):
    task, dm = house_task_dm(house_dir)
    kwargs = {"hidden_sizes": (8,), "numeric_embedding": "plr", "embedding_frequencies": 4, "embedding_dim": 3}
    config = TrainConfig(model_kwargs=kwargs, max_epochs=2, batch_size=16)
    result = cross_validate(task, config, datamodule=dm, stacking="vmap")  # one stack, to compare with
    folder = Predictor.from_fits(task, config, result.fits, dm).save(tmp_path / "model")
    with torch.no_grad():
        expected = result.fits[0].module.eval()(dm.members.test_features.x)
    raw = pd.read_csv(house_dir / "house-prices" / "test.csv")
    reloaded = Predictor.load(folder)
    assert reloaded.config.model_kwargs["numeric_embedding"] == "plr"
    torch.testing.assert_close(reloaded.member_outputs(raw), expected, rtol=1e-5, atol=1e-6)
