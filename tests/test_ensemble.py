"""The study's ensemble: every trial's out-of-fold predictions, greedy selection with replacement,
and the ensemble a resumed sweep exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import pytest
import torch

from project.artifacts.predictor import Ensemble, EstimatorPredictor, Predictor, load_predictor
from project.config import TrainConfig, preset_path
from project.cv import cross_validate
from project.data import TableDataModule
from project.ensemble.estimators import cross_fit, predict
from project.ensemble.selection import Predictions, blend, cv_score, held_out_score, out_of_fold, scores, select
from project.sweep.export import fit_estimators, selected_refits
from project.sweep.space import suggest_config
from project.tasks import Task, get_task
from project.validate import load_preset
from tests.conftest import house_task_dm
from tests.test_reliability import REPO, SWEEP, sweep_args, trials


@pytest.mark.parametrize("stacking", ["auto", "sequential"])
def test_out_of_fold_predictions_cover_every_row_once_as_its_fold_model_predicts_it(house_dir, stacking):
    task, dm = house_task_dm(house_dir)
    config = TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=5, batch_size=16)
    result = cross_validate(task, config, stacking=stacking, datamodule=dm)
    kept = out_of_fold(task, result, dm)
    assert np.array_equal(kept.rows, np.arange(len(dm.targets)))  # every training row, once
    for m, rows in enumerate(dm.members.val_rows):
        assert (kept.folds[rows.numpy()] == dm.members.folds[m]).all()

    # the same fold models, from raw rows through each fold's own preprocessing
    predictor = Predictor.from_fits(task, config, result.fits, dm)
    outputs = predictor.member_outputs(pd.read_csv(house_dir / "house-prices" / "train.csv"))
    expected = np.empty(len(dm.targets))
    for m, rows in enumerate(dm.members.val_rows):
        expected[rows.numpy()] = outputs[m, rows].numpy()
    np.testing.assert_allclose(kept.oof, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(kept.test, predictor.averaged(dm.test_inputs()).numpy(), rtol=1e-5, atol=1e-6)
    # and its score is the metric over all rows, which the fold scores make up
    rmse = float(np.sqrt(np.mean((kept.oof - dm.targets.numpy()) ** 2)))
    assert scores(task, kept.oof[None], dm.targets.numpy())[0] == pytest.approx(rmse, rel=1e-6)
    assert rmse == pytest.approx(
        np.sqrt(np.average(np.square(result.fold_scores), weights=[len(r) for r in dm.members.val_rows])), rel=1e-4
    )
    assert cv_score(task, kept.oof, dm.targets.numpy(), kept.folds) == pytest.approx(result.mean, rel=1e-5)


@pytest.mark.parametrize("names", [(3, 7, 9), ("lasso", 4, "boosting")])
def test_selection_finds_the_known_best_mix(names):
    """Two members whose errors cancel exactly, a third that is only worse: half each; trials by
    number and estimators by name alike."""
    task = get_task("house-prices")
    rng = np.random.default_rng(0)
    y = rng.normal(12.0, 0.4, 500)
    error = rng.normal(0.0, 0.1, 500)
    rows = np.arange(500)
    folds = rows % 5
    first, second, worse = names
    library = {
        first: Predictions(rows, folds, y + error),
        second: Predictions(rows, folds, y - error),
        worse: Predictions(rows, folds, y + 0.05 + rng.normal(0.0, 0.3, 500)),
    }
    weights = select(task, library, y)
    assert weights == {first: 0.5, second: 0.5}
    assert scores(task, blend(library, weights)[None], y)[0] == pytest.approx(0.0, abs=1e-9)


def test_an_estimators_kept_predictions_are_its_fold_models_on_raw_rows(house_dir, tmp_path):
    """Each fold's estimator predicts its own validation rows, from raw rows through that fold's
    preprocessing, and the saved ensemble of a trial and the estimator blends what both kept."""
    task, dm = house_task_dm(house_dir)
    fitted = cross_fit(task, "lasso", dm)
    kept = fitted.predictions
    assert np.array_equal(kept.rows, np.arange(len(dm.targets)))
    train = pd.read_csv(house_dir / "house-prices" / "train.csv")
    predictor = EstimatorPredictor.from_fitted(task, fitted, dm)
    for m, rows in enumerate(dm.members.val_rows):
        assert (kept.folds[rows.numpy()] == dm.members.folds[m]).all()
        alone = predict(
            task,
            predictor.models[m],
            predictor.preprocessors[m].transform(TableDataModule.rows_of(task.preset, train)),
            1,
        )
        np.testing.assert_allclose(kept.oof[rows.numpy()], alone[rows.numpy()], rtol=1e-9)
    assert cv_score(task, kept.oof, dm.targets.numpy(), kept.folds) == pytest.approx(fitted.cv)
    assert fitted.cv == pytest.approx(
        np.mean(
            [
                np.sqrt(np.mean((kept.oof[r] - dm.targets.numpy()[r]) ** 2))
                for r in (v.numpy() for v in dm.members.val_rows)
            ]
        ),
        rel=1e-6,
    )

    config = TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=3, batch_size=16)
    result = cross_validate(task, config, datamodule=dm)
    library = {0: out_of_fold(task, result, dm), "lasso": kept}
    ensemble = Ensemble([0.25, 0.75], [Predictor.from_fits(task, config, result.fits, dm), predictor], [0, "lasso"])
    reloaded = load_predictor(ensemble.save(tmp_path / "model"))
    assert isinstance(reloaded.predictors[1], EstimatorPredictor) and reloaded.members == [0, "lasso"]
    np.testing.assert_allclose(
        reloaded.averaged(dm.test_inputs()).numpy(), blend(library, {0: 0.25, "lasso": 0.75}, "test"), rtol=1e-5
    )


def test_an_estimator_that_does_not_fit_is_named_and_left_out(house_dir):
    task, dm = house_task_dm(house_dir)
    task = Task(load_preset(preset_path("house-prices"), ["sweep.estimators.lasso.args.alpha=-1.0"]))
    fitted, failed = fit_estimators(
        optuna.create_study(), SimpleNamespace(task=task), dm, None, house_dir, parent_run_id=None
    )
    assert set(fitted) == {"boosting"} and set(failed) == {"lasso"}
    assert re.search(
        r"house-prices\.yaml: key 'sweep\.estimators\.lasso': sklearn\.linear_model:Lasso did not fit: "
        r".*'alpha'",
        failed["lasso"],
    ), failed["lasso"]
    assert (house_dir / "predictions" / "estimator-boosting.npz").is_file()


def test_the_selections_held_out_score_shows_its_optimism():
    """Members that are the targets plus independent noise: the weights fitted to every row score
    them better than weights chosen on the other folds score each fold; a member that is exact is
    found either way."""
    task = get_task("house-prices")
    rng = np.random.default_rng(3)
    y = rng.normal(12.0, 0.4, 400)
    rows = np.arange(400)
    folds = rows % 4
    library = {n: Predictions(rows, folds, y + rng.normal(0.0, 0.1, 400)) for n in range(12)}
    chosen = cv_score(task, blend(library, select(task, library, y)), y, folds)
    held_out = held_out_score(task, library, y, folds)
    assert chosen < held_out < min(cv_score(task, p.oof, y, folds) for p in library.values())
    library["exact"] = Predictions(rows, folds, y.copy())
    assert held_out_score(task, library, y, folds) == pytest.approx(0.0, abs=1e-12)
    assert held_out_score(task, library, y, np.zeros(400, dtype=int)) is None  # one validated fold


def test_selection_of_classifiers_averages_probabilities():
    task = get_task("fashion-mnist")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 400)
    right = np.eye(10)[labels]
    # each trial is sure and right on its own half of the rows, and unsure elsewhere
    halves = [np.arange(400) < 200, np.arange(400) >= 200]
    rows, folds = np.arange(400), np.zeros(400, dtype=int)
    library = {n: Predictions(rows, folds, np.where(h[:, None], 0.9 * right + 0.01, 0.1)) for n, h in enumerate(halves)}
    library[2] = Predictions(rows, folds, np.full((400, 10), 0.1))  # knows nothing
    weights = select(task, library, labels)
    assert set(weights) == {0, 1}
    assert scores(task, blend(library, weights)[None], labels)[0] == 1.0
    assert max(scores(task, library[n].oof[None], labels)[0] for n in (0, 1)) < 0.6


@pytest.mark.slow
def test_a_resumed_studys_ensemble_draws_on_both_commands(real_data, tmp_path):
    args = [*sweep_args(real_data, tmp_path, "--no-pruning", "--n-jobs", "1"), "--max-epochs", "20"]
    for _command in range(2):
        sweep = subprocess.run(
            [*SWEEP, *args, "--n-trials", "3"], cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert sweep.returncode == 0, sweep.stderr[-2000:]
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    study = trials(f"sqlite:///{out / 'optuna.db'}")
    complete = [t.number for t in study if t.state.name == "COMPLETE"]
    assert len(complete) >= 5 and summary["ensemble"]["library"] == len(complete)  # both commands' trials
    # the preset's estimators are weighed beside the trials
    assert summary["ensemble"]["estimators"] == ["lasso", "boosting"] and set(summary["estimators"]) == {
        "lasso",
        "boosting",
    }
    members = {m.get("trial", m.get("estimator")): m["weight"] for m in summary["ensemble"]["members"]}
    assert set(members) <= {*complete, "lasso", "boosting"} and sum(members.values()) == pytest.approx(1.0)
    assert summary["ensemble"]["oof_rmse"] <= summary["ensemble"]["best_trial_oof_rmse"]
    assert summary["ensemble"]["cv_rmse"] <= summary["cv_mean"] * 1.01
    assert "ensemble of" in sweep.stdout

    # the saved model is that ensemble: its fold models, trained again, predict what the members kept
    model = load_predictor(out / "model")
    test = pd.read_csv(real_data / "house-prices" / "test.csv")
    if len(members) > 1:
        assert isinstance(model, Ensemble) and dict(zip(model.members, model.weights)) == members
    library = {
        n: Predictions.load(out / "predictions" / (f"trial-{n}.npz" if isinstance(n, int) else f"estimator-{n}.npz"))
        for n in members
    }
    np.testing.assert_allclose(model.averaged(test).numpy(), blend(library, members, "test"), rtol=1e-5)
    submission = pd.read_csv(out / "submission.csv")
    np.testing.assert_allclose(model.predict(test)["SalePrice"], submission["SalePrice"], rtol=1e-6)
    np.testing.assert_allclose(submission["SalePrice"], np.exp(blend(library, members, "test")), rtol=1e-5)

    # a trial whose file is not on this machine (its worker ran on another) comes from its MLflow run
    (out / "predictions" / f"trial-{complete[0]}.npz").unlink()
    export = subprocess.run(
        [
            sys.executable,
            str(REPO / "experiments" / "export_submission.py"),
            "--output-dir",
            str(out),
            "--data-dir",
            str(real_data),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert export.returncode == 0, export.stderr[-2000:]
    again = json.loads((out / "summary.json").read_text())["ensemble"]
    assert again["library"] == len(complete) and again["members"] == summary["ensemble"]["members"]


def test_a_refitting_task_refits_the_configurations_its_ensemble_weights_most():
    """Images are scored on one validation fold, then refitted: the configurations the selection
    weights, up to the refit's budget, are refitted once each, their weights renormalised."""
    task = get_task("fashion-mnist")
    start = dict(task.preset.model_preset("mlp").start)
    study = optuna.create_study(direction="maximize")
    for number, lr in enumerate([1e-3, 2e-3, 5e-4, 3e-4]):
        params = {**start, "lr": lr}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=_distributions(task, params), value=0.9 - 0.01 * number
            )
        )
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 300)
    right = np.eye(10)[labels]
    thirds = [np.arange(300) // 100 == k for k in range(3)]
    rows, folds = np.arange(300), np.zeros(300, dtype=int)
    # trials 0 to 2 are each sure and right on their own third; trial 3 knows nothing
    library = {n: Predictions(rows, folds, np.where(t[:, None], 0.9 * right + 0.01, 0.1)) for n, t in enumerate(thirds)}
    library[3] = Predictions(rows, folds, np.full((300, 10), 0.1))
    settings = SimpleNamespace(task=task, model="mlp", fixed={})
    summary = {}
    refits = selected_refits(
        study, settings, summary, library, SimpleNamespace(targets=torch.as_tensor(labels)), study.best_trial
    )
    assert [r.trial for r in refits] == [0, 1, 2] and all(r.seeds == 1 for r in refits)
    assert sum(r.weight for r in refits) == pytest.approx(1.0)
    assert [r.config.lr for r in refits] == [1e-3, 2e-3, 5e-4]
    assert summary["ensemble"]["oof_acc"] == 1.0 and len(summary["ensemble"]["refit"]) == 3
    del library[1], library[2]  # the best trial alone: refitted on the preset's seeds, as without selection
    assert (
        selected_refits(
            study, settings, {}, library, SimpleNamespace(targets=torch.as_tensor(labels)), study.best_trial
        )
        == []
    )


def _distributions(task, params: dict) -> dict:
    """The distributions a trial of the preset's search space draws ``params`` from."""
    recorder = optuna.create_study()
    trial = recorder.ask()
    suggest_config(trial, task, "mlp", {})
    return {name: trial.distributions[name] for name in params}


def test_out_of_fold_predictions_run_on_the_device_each_fit_trained_on(house_dir, monkeypatch):
    """Lightning hands a module back on the CPU after fit; the out-of-fold and test predictions move
    it, and cut their batches, to the device the fit recorded (here the CPU, on a GPU its cuda:0)."""
    from project.engine import FoldModule
    from project.utils.devices import training_device

    task, dm = house_task_dm(house_dir)
    result = cross_validate(task, TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=1), datamodule=dm)
    assert [f.device for f in result.fits] == [training_device()] * len(result.fits)
    asked, ran = [], []
    loaders = {name: getattr(dm, name) for name in ("val_loader", "test_loader")}
    for name, original in loaders.items():
        monkeypatch.setattr(dm, name, lambda *a, original=original, **k: asked.append(k["device"]) or original(*a, **k))
    step = FoldModule.predict_step
    monkeypatch.setattr(
        FoldModule,
        "predict_step",
        lambda self, batch, index: (
            ran.append((next(self.parameters()).device, getattr(batch["x"], "dense", batch["x"]).device))
            or step(self, batch, index)
        ),
    )
    out_of_fold(task, result, dm)
    assert asked == [training_device()] * 2 * len(result.fits)
    assert ran and set(ran) == {(training_device(), training_device())}
