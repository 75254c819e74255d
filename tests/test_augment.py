"""Image augmentation: random crops, mirror images and random erasing touch training batches
only, keep shapes and labels, are drawn from the seed, and come from the preset's data.augment."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from project.config import Augment, TrainConfig
from project.cv import fit
from project.data.augment import random_erase, random_flip
from project.tasks import Task, get_task
from project.validate import load_preset
from tests.test_presets import SHAPES, write_image_folders

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import train  # noqa: E402

ALL = Augment(translate=2, flip=True, erase=0.5)


def test_a_flip_mirrors_some_images_and_leaves_the_others():
    images = torch.arange(40 * 2 * 3 * 5, dtype=torch.uint8).view(40, 2, 3, 5)
    out = random_flip(images, torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    assert all(m or torch.equal(o, i) for m, o, i in zip(mirrored, out, images))
    assert 10 < sum(mirrored) < 30


def test_erasing_blanks_one_rectangle_of_a_third_of_the_image_at_most():
    images = torch.full((200, 2, 28, 28), 7, dtype=torch.uint8)
    out = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    blank = out[:, 0] == 0
    assert torch.equal(out[:, 0] == 0, out[:, 1] == 0)  # the channels of an image together
    counts = blank.flatten(1).sum(1)
    assert 60 < (counts > 0).sum() < 140  # about half the images
    for mask in blank[counts > 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask.sum() == height * width <= 28 * 28 / 3 + 28  # one rectangle, rounded
    assert (out[blank.unsqueeze(1).expand_as(out) == 0] == 7).all()  # nothing else changes


def image_dm(task: Task, data_dir: Path):
    dm = task.datamodule(data_dir, n_folds=5, fold=0)
    dm.setup()
    return dm


def batches(dm, augment: Augment | None, seed: int = 0) -> list[dict]:
    dm.seed = seed
    return list(dm.train_loader(32, chunked=False, augment=augment))


def test_augmentations_keep_shapes_and_labels_and_follow_the_seed(idx_dir):
    dm = image_dm(get_task("fashion-mnist"), idx_dir)
    plain, augmented, again = batches(dm, None), batches(dm, ALL), batches(dm, ALL)
    other = batches(dm, ALL, seed=1)
    for a, b in zip(plain, augmented):
        assert a["x"].shape == b["x"].shape and torch.equal(a["y"], b["y"]) and torch.equal(a["w"], b["w"])
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(plain, augmented))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(augmented, again))
    assert not torch.equal(augmented[0]["x"], other[0]["x"])


class Seen(L.Callback):
    def __init__(self) -> None:
        self.train: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.train.append(batch["x"].clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val.append(batch["x"].clone())


def test_augmentations_touch_training_batches_only(idx_dir):
    """A fit with every augmentation validates on the very batches of one without, and tests on
    the same predictions' inputs; its training batches differ."""
    task = get_task("fashion-mnist")
    dm = image_dm(task, idx_dir)
    small = {"model_kwargs": {"channels": (8,), "hidden": 16}, "max_epochs": 2, "batch_size": 64}
    seen = {}
    for name, augment in (("plain", Augment()), ("augmented", ALL)):
        seen[name] = Seen()
        config = task.config("cnn", **small, **dataclasses.asdict(augment))
        fit(task, config, dm, seed=0, callbacks=[seen[name]])
    plain, augmented = seen["plain"], seen["augmented"]
    assert len(plain.val) == len(augmented.val) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain.val, augmented.val))
    assert not torch.equal(plain.train[0], augmented.train[0])
    assert dm.val_loader().augment is None and dm.test_loader().augment is None


def test_the_presets_data_augment_is_every_models_default_and_refused_on_a_table(tmp_path):
    preset = tmp_path / "shapes.yaml"
    preset.write_text(
        SHAPES.replace(
            "data: {kind: image-folder, dataset: shapes}",
            "data: {kind: image-folder, dataset: shapes, augment: {translate: 1, flip: true}}",
        )
    )
    task = Task(load_preset(preset))
    assert task.config().augment == Augment(translate=1, flip=True)
    assert task.config(flip=False).augment == Augment(translate=1)  # a model's or a trial's own setting wins
    assert TrainConfig().augment == Augment()


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ("{kind: image-folder, dataset: shapes, augment: {erase: 1.5}}", "key 'data.augment': erase=1.5 is invalid"),
        (
            "{kind: csv, dataset: shapes, id: Id, target: y, augment: {flip: true}}",
            "key 'data.augment': augments training images",
        ),
    ],
)
def test_a_bad_augment_section_is_refused_naming_the_key(tmp_path, capsys, data, said):
    preset = tmp_path / "shapes.yaml"
    preset.write_text(SHAPES.replace("data: {kind: image-folder, dataset: shapes}", f"data: {data}"))
    with pytest.raises(SystemExit) as stop:
        train.main(["--config", str(preset), "--data-dir", str(tmp_path)])
    assert stop.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.slow
def test_an_image_folder_task_trains_with_its_presets_augmentation(tmp_path):
    write_image_folders(tmp_path / "data" / "shapes")
    preset = tmp_path / "shapes.yaml"
    preset.write_text(
        SHAPES.replace(
            "data: {kind: image-folder, dataset: shapes}",
            "data: {kind: image-folder, dataset: shapes, augment: {translate: 1, flip: true, erase: 0.25}}",
        )
    )
    out = tmp_path / "out"
    args = ["--config", str(preset), "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)]
    assert train.main([*args, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["params"]["translate"], summary["params"]["flip"], summary["params"]["erase"]) == (1, True, 0.25)
    assert summary["cv_mean"] > 0.5


def test_tta_flip_averages_each_prediction_with_the_mirror_images_in_training_and_in_the_saved_model(idx_dir):
    """Validation (so the sweep's choice), test and the predictor's submission all see the same
    average of an image's and its mirror image's outputs."""
    from project.artifacts.predictor import Predictor
    from project.cv import cross_validate

    task = get_task("fashion-mnist")
    dm = image_dm(task, idx_dir)
    small = {"model_kwargs": {"channels": (8,), "hidden": 16, "dropout": 0.0}, "max_epochs": 1, "batch_size": 64}
    result = cross_validate(task, task.config("cnn", **small, tta_flip=True), datamodule=dm)
    module = result.fits[0].module.eval()
    batch = next(iter(dm.val_loader()))
    outputs, mirrored = (module.head(module.net(x)) for x in (batch["x"], batch["x"].flip(-1)))
    with torch.no_grad():
        torch.testing.assert_close(module(batch["x"]), (outputs + mirrored) / 2)
    pixels = dm.test_inputs()
    flipped = Predictor.from_fits(task, task.config("cnn", **small, tta_flip=True), result.fits, dm)
    plain = Predictor.from_fits(task, task.config("cnn", **small), result.fits, dm)
    torch.testing.assert_close(
        flipped.member_outputs(pixels),
        (plain.member_outputs(pixels) + plain.member_outputs(pixels[..., ::-1].copy())) / 2,
    )
