"""A task is one preset file: real CSVs shipped inside scikit-learn, swept end to end to a submission
in their own format, with no change to the package; bad presets refused before any work."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from project.config import PresetError, from_resolved, preset_path
from project.tasks import Task
from project.validate import load_preset
from tests.conftest import write_sklearn_csvs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import export_submission  # noqa: E402
import sweep  # noqa: E402
import train  # noqa: E402

IRIS = """\
name: iris
kind: classification
metric: acc
folds: 3
data: {kind: csv, dataset: iris, id: id, target: species}
model: mlp
models:
  mlp:
    args: {hidden_sizes: [16]}
    train: {batch_size: 16, max_epochs: 30, lr: 1.0e-2}
    search:
      lr: {low: 3.0e-3, high: 3.0e-2, log: true}
      model.dropout: {low: 0.0, high: 0.3}
    start: {lr: 1.0e-2, dropout: 0.0}
sweep: {trials: 3, jobs: 1}
"""

CONCAVITY = """\
name: concavity
kind: regression
metric: rmse
folds: 3
data:
  kind: csv
  dataset: concavity
  id: id
  target: worst_concavity
  target_transform: log1p  # zero in 13 rows: log is refused, log1p is not
model: mlp
models:
  mlp:
    args: {hidden_sizes: [32]}
    train: {batch_size: 32, max_epochs: 20, lr: 3.0e-3, weight_decay: 1.0e-3}
    search:
      lr: {low: 1.0e-3, high: 1.0e-2, log: true}
    start: {lr: 3.0e-3}
sweep: {trials: 2, jobs: 1}
"""


def write_preset(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def run_sweep(tmp_path: Path, preset: Path, *extra: str) -> dict:
    args = [
        "--config",
        str(preset),
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "out"),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        *extra,
    ]
    assert sweep.main(args) == 0
    return json.loads((tmp_path / "out" / "summary.json").read_text())


@pytest.mark.slow
def test_classification_with_string_labels_from_a_preset_alone(tmp_path):
    held_out = write_sklearn_csvs(tmp_path / "data" / "iris", "iris")
    summary = run_sweep(tmp_path, write_preset(tmp_path, IRIS))
    assert summary["n_trials"] == 3 and summary["metric"] == "acc" and summary["cv_mean"] > 0.8
    submission = pd.read_csv(summary["submission"])
    assert list(submission.columns) == ["id", "species"]
    assert submission["id"].tolist() == held_out.index.tolist()  # one row per test row, in file order
    assert set(submission["species"]) <= {"setosa", "versicolor", "virginica"}
    assert (submission["species"].to_numpy() == held_out.to_numpy()).mean() > 0.8
    # the study stores the resolved preset, and its MLflow run holds it as an artifact
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    artifacts = {a.path for a in client.list_artifacts(summary["mlflow"]["run_id"])}
    assert {"preset.yaml", "submission.csv"} <= artifacts
    import optuna

    from project.sweep.study import make_storage

    study = optuna.load_study(study_name="iris", storage=make_storage(summary["study"]["storage"]))
    assert study.user_attrs["preset"]["data"]["target"] == "species"


@pytest.mark.slow
def test_class_probabilities_where_the_preset_asks(tmp_path):
    write_sklearn_csvs(tmp_path / "data" / "iris", "iris")
    summary = run_sweep(
        tmp_path,
        write_preset(tmp_path, IRIS),
        "--set",
        "submission.probabilities=true",
        "--n-trials",
        "1",
        "--set",
        "metric=logloss",
    )
    submission = pd.read_csv(summary["submission"])
    assert list(submission.columns) == ["id", "setosa", "versicolor", "virginica"]
    np.testing.assert_allclose(submission[["setosa", "versicolor", "virginica"]].sum(axis=1), 1, atol=1e-6)
    assert summary["direction"] == "minimize" and 0 < summary["cv_mean"] < 1


@pytest.mark.slow
def test_binary_classification_scores_roc_auc(tmp_path):
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.insert(0, "id", np.arange(len(frame)))
    frame["diagnosis"] = np.where(frame.pop("target") == 1, "benign", "malignant")
    folder = tmp_path / "data" / "cancer"
    folder.mkdir(parents=True)
    frame.iloc[:450].to_csv(folder / "train.csv", index=False)
    frame.iloc[450:].drop(columns="diagnosis").to_csv(folder / "test.csv", index=False)
    text = (
        IRIS.replace("name: iris", "name: cancer")
        .replace("metric: acc", "metric: auc")
        .replace("dataset: iris, id: id, target: species", "dataset: cancer, id: id, target: diagnosis")
    )
    summary = run_sweep(tmp_path, write_preset(tmp_path, text), "--n-trials", "1")
    assert summary["cv_mean"] > 0.95  # ROC AUC of the three fold models
    assert set(pd.read_csv(summary["submission"])["diagnosis"]) <= {"benign", "malignant"}


@pytest.mark.slow
def test_regression_with_a_target_that_can_be_zero(tmp_path, capsys):
    held_out = write_sklearn_csvs(tmp_path / "data" / "concavity", "concavity")
    summary = run_sweep(tmp_path, write_preset(tmp_path, CONCAVITY))
    submission = pd.read_csv(summary["submission"])
    assert list(submission.columns) == ["id", "worst_concavity"]
    assert submission["id"].tolist() == held_out.index.tolist()
    predicted = submission["worst_concavity"].to_numpy()
    assert np.isfinite(predicted).all() and predicted.min() > -1  # expm1 of the log1p-scale predictions
    assert np.corrcoef(predicted, held_out.to_numpy())[0, 1] > 0.7  # a real fit, on the original scale
    # the same target through log: its zeros are refused, naming the file, column and row
    code = train.main(
        [
            "--config",
            str(write_preset(tmp_path, CONCAVITY.replace("log1p ", "log "))),
            "--data-dir",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "out2"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    assert code == 1
    assert re.search(
        r"concavity/train\.csv: column 'worst_concavity' row \d+: 0\.0, expected a positive number in "
        r"every row \(target transform 'log'\)",
        capsys.readouterr().err,
    )


@pytest.mark.parametrize(
    "edit, message",
    [
        (("model: mlp\nmodels", "modle: mlp\nmodels"), r"key 'modle': Key 'modle' not in 'Preset'"),
        (("folds: 3", "folds: three"), r"key 'folds': Value 'three' of type 'str' could not be converted to Integer"),
        (("metric: acc", "metric: rmse"), r"key 'metric': 'rmse' is not allowed; expected one of acc, logloss, auc"),
        (("target: species", "target: kind"), r"key 'data.target': .*train\.csv has no column 'kind'"),
        (("dataset: iris", "dataset: nowhere"), r"key 'data.train': .*nowhere/train\.csv not found"),
        (("model.dropout", "model.dropuot"), r"key 'models.mlp.search.model.dropuot': names no setting"),
        (("hidden_sizes: [16]", "hidden_size: [16]"), r"key 'models.mlp': model 'mlp' takes no argument 'hidden_size'"),
        (("start: {lr: 1.0e-2, dropout: 0.0}", "start: {lr: 1.0e-2, depth: 1}"), r"key 'models.mlp.start': depth"),
        (
            ("jobs: 1}", "jobs: 1, estimators: {lr: {estimator: 'sklearn.linear_model:Logistic'}}}"),
            r"key 'sweep.estimators.lr.estimator': 'sklearn.linear_model:Logistic' is not importable; "
            r"expected 'module:Class'",
        ),
        (
            (
                "jobs: 1}",
                "jobs: 1, estimators: {lr: {estimator: 'sklearn.linear_model:LogisticRegression', args: {c: 1}}}}",
            ),
            r"key 'sweep.estimators.lr.args': .*unexpected keyword argument 'c'",
        ),
        (
            ("jobs: 1}", "jobs: 1, estimators: {lasso: {estimator: 'sklearn.linear_model:Lasso'}}}"),
            r"key 'sweep.estimators.lasso.estimator': 'sklearn.linear_model:Lasso' has no fit and predict_proba "
            r"methods; expected a scikit-learn classification estimator",
        ),
    ],
)
def test_a_bad_preset_is_refused_before_any_work(tmp_path, capsys, edit, message):
    write_sklearn_csvs(tmp_path / "data" / "iris", "iris")
    preset = write_preset(tmp_path, IRIS.replace(*edit))
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(
            [
                "--config",
                str(preset),
                "--data-dir",
                str(tmp_path / "data"),
                "--output-dir",
                str(tmp_path / "out"),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --config" in err and str(preset) in err and re.search(message, err), err
    assert not (tmp_path / "out" / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_unknown_task_names_the_presets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--task", "nope"])
    assert exit_info.value.code == 2
    assert re.search(
        r"argument --task: no preset 'nope'.*"
        r"the presets are affairs, diamonds, fashion-mnist, house-prices, mnist, penguins\n",
        capsys.readouterr().err,
    )


def test_duplicate_ids_are_refused_when_the_file_is_read(tmp_path, capsys):
    write_sklearn_csvs(tmp_path / "data" / "iris", "iris")
    train_csv = tmp_path / "data" / "iris" / "train.csv"
    frame = pd.read_csv(train_csv)
    frame.loc[5, "id"] = frame.loc[2, "id"]
    frame.to_csv(train_csv, index=False)
    code = train.main(
        [
            "--config",
            str(write_preset(tmp_path, IRIS)),
            "--data-dir",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    assert code == 1
    assert re.search(
        rf"{re.escape(str(train_csv))}: column 'id' repeats id {frame.loc[2, 'id']} \(lines 4 and 7\)",
        capsys.readouterr().err,
    )


def test_shipped_presets_load_and_extend():
    fashion, digits = (Task(load_preset(preset_path(n))) for n in ("fashion-mnist", "mnist"))
    assert digits.preset.data.dataset == "mnist" and digits.preset.models == fashion.preset.models
    assert fashion.refits and fashion.seeds == 3 and fashion.preset.sweep.validation_folds == 1
    house = Task(load_preset(preset_path("house-prices"), ["folds=3"], {"model": "mlp"}))
    assert house.folds == 3 and house.preset.submission.id_range == [1461, 2919]
    assert from_resolved(house.preset.resolved()) == house.preset
    for table, estimator in [("diamonds", "Regressor"), ("affairs", "Classifier"), ("penguins", "Classifier")]:
        preset = Task(load_preset(preset_path(table))).preset
        assert preset.models["mlp"].args["numeric_embedding"] == "plr" and preset.sweep.trials == 12
        assert preset.sweep.estimators["boosting"].estimator == f"sklearn.ensemble:HistGradientBoosting{estimator}"


SHAPES = """\
name: shapes
kind: classification
metric: acc
folds: 2
data: {kind: image-folder, dataset: shapes}
model: cnn
models:
  cnn:
    args: {channels: [8], hidden: 16, dropout: 0.0, groups: 4}
    train: {batch_size: 16, max_epochs: 8, lr: 1.0e-2}
submission: {file: predictions.csv, id: file, target: label}
final: {refit: true, seeds: 2}
"""


def write_image_folders(root: Path, labelled_test: bool = True, size: int = 12) -> None:
    """Colour PNGs of three classes: a red, a green or a blue square on dark noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("test", 6)):
        for label, channel in (("blue", 2), ("green", 1), ("red", 0)):
            folder = root / split / (label if split == "train" or labelled_test else "")
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                pixels[3:9, 3:9, channel] = 250
                Image.fromarray(pixels).save(folder / f"{label}-{i:02d}.png")


@pytest.mark.slow
@pytest.mark.parametrize("labelled_test", [True, False])
def test_an_image_folder_task_from_a_preset_alone(tmp_path, labelled_test):
    write_image_folders(tmp_path / "data" / "shapes", labelled_test)
    code = train.main(
        [
            "--config",
            str(write_preset(tmp_path, SHAPES)),
            "--data-dir",
            str(tmp_path / "data"),
            "--output-dir",
            str(tmp_path / "out"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    predictions = pd.read_csv(summary["submission"])
    assert list(predictions.columns) == ["file", "label"] and len(predictions) == 18
    assert predictions["file"].str.endswith(".png").all() and set(predictions["label"]) <= {"blue", "green", "red"}
    if labelled_test:  # scored once, by the refit's two seeds averaged
        assert summary["test_accuracy"] > 0.9 and len(summary["test_accuracy_members"]) == 2
        assert predictions["file"].iloc[0] == "blue/blue-00.png"
    else:
        assert "test_accuracy" not in summary
        assert (predictions["label"] == predictions["file"].str.split("-").str[0]).mean() > 0.9


def test_image_folder_reads_colour_and_the_images_own_size(tmp_path):
    write_image_folders(tmp_path / "shapes", size=10)
    task = Task(load_preset(write_preset(tmp_path, SHAPES)))
    dm = task.datamodule(tmp_path, fold=[0, 1])
    dm.setup()
    assert dm.sample_shape == (3, 10, 10) and dm.out_features == 3 and dm.classes == ["blue", "green", "red"]
    assert len(dm.members.train_rows[0]) + len(dm.members.val_rows[0]) == 72 and dm.test_size == 18
    resized = Task(load_preset(write_preset(tmp_path, SHAPES), ["data.image_size=[8, 6]"])).datamodule(tmp_path)
    resized.setup()
    assert resized.sample_shape == (3, 8, 6)


@pytest.mark.slow
def test_estimators_are_refused_where_no_fold_models_predict_the_test_rows():
    with pytest.raises(
        PresetError,
        match=r"fashion-mnist\.yaml: key 'sweep.estimators': estimators join the "
        r"ensemble of a CSV task .* \(data.kind 'idx', final.refit True\)",
    ):
        load_preset(preset_path("fashion-mnist"), ["sweep.estimators.lr.estimator=sklearn.linear_model:Lasso"])


def test_an_estimator_joins_the_sweeps_ensemble_and_its_submission(tmp_path, capsys):
    """A classifier of scikit-learn's beside the trials: fitted on their folds, weighed by the
    selection, saved in the model that wrote the submission, tracked as a child run of the study's;
    one that cannot fit is named, left out, and the sweep says so in its exit code."""
    from project.artifacts.predictor import load_predictor
    from project.ensemble.selection import Predictions, blend

    write_sklearn_csvs(tmp_path / "data" / "iris", "iris")
    estimators = (
        "jobs: 1, estimators: {logistic: {estimator: 'sklearn.linear_model:LogisticRegression', "
        "args: {C: 10.0, max_iter: 1000}}}}"
    )
    summary = run_sweep(tmp_path, write_preset(tmp_path, IRIS.replace("jobs: 1}", estimators)), "--n-trials", "2")
    assert summary["estimators"]["logistic"]["cv_acc"] > 0.9
    assert summary["ensemble"]["estimators"] == ["logistic"] and summary["ensemble"]["library"] == 2
    out = tmp_path / "out"
    weights = {m.get("trial", m.get("estimator")): m["weight"] for m in summary["ensemble"]["members"]}
    library = {
        n: Predictions.load(out / "predictions" / (f"trial-{n}.npz" if isinstance(n, int) else f"estimator-{n}.npz"))
        for n in weights
    }
    model = load_predictor(out / "model")
    test = pd.read_csv(tmp_path / "data" / "iris" / "test.csv")
    np.testing.assert_allclose(model.averaged(test).numpy(), blend(library, weights, "test"), rtol=1e-5, atol=1e-7)
    labels = np.array(model.inputs["classes"])[blend(library, weights, "test").argmax(axis=1)]
    assert (pd.read_csv(summary["submission"])["species"].to_numpy() == labels).all()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([summary["mlflow"]["experiment_id"]], "tags.kind = 'estimator'")[0]
    assert run.info.run_name == "estimator-logistic" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == summary["mlflow"]["run_id"]
    assert run.data.metrics["cv_mean"] == pytest.approx(summary["estimators"]["logistic"]["cv_acc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "predictions")] == [
        "predictions/estimator-logistic.npz"
    ]
    # exported again, the same estimator logs to the same run
    assert (
        export_submission.main(
            [
                "--study-name",
                "iris",
                "--output-dir",
                str(out),
                "--data-dir",
                str(tmp_path / "data"),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
            ]
        )
        == 0
    )
    runs = client.search_runs([summary["mlflow"]["experiment_id"]], "tags.kind = 'estimator'")
    assert [r.info.run_id for r in runs] == [run.info.run_id]
    assert len(client.get_metric_history(run.info.run_id, "cv_mean")) == 2
    # --ensemble trials: selected from the trials alone, no estimator fitted
    assert (
        export_submission.main(
            [
                "--study-name",
                "iris",
                "--output-dir",
                str(out),
                "--data-dir",
                str(tmp_path / "data"),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--ensemble",
                "trials",
            ]
        )
        == 0
    )
    trials_only = json.loads((out / "summary.json").read_text())
    assert trials_only["estimators"] == {} and trials_only["ensemble"]["estimators"] == []
    assert all("trial" in m for m in trials_only["ensemble"]["members"])
    assert len(client.get_metric_history(run.info.run_id, "cv_mean")) == 2

    # a value scikit-learn refuses only when it fits: the trials and the rest of the export are kept
    capsys.readouterr()
    failing = IRIS.replace("jobs: 1}", estimators.replace("C: 10.0", "C: -1.0"))
    args = [
        "--config",
        str(write_preset(tmp_path, failing)),
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(out),
        "--tracking-uri",
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--n-trials",
        "1",
    ]
    assert sweep.main(args) == 1
    err = capsys.readouterr().err
    assert re.search(
        r"error: .*preset\.yaml: key 'sweep\.estimators\.logistic': "
        r"sklearn\.linear_model:LogisticRegression did not fit: .*'C'.*; the ensemble was selected without it",
        err,
    ), err
    again = json.loads((out / "summary.json").read_text())
    assert again["n_complete"] == 3 and "logistic" in again["estimator_errors"] and Path(again["submission"]).is_file()
    assert "Traceback" not in err


def test_the_readmes_preset_sweeps_to_its_submission(tmp_path):
    """The recipe as the README shows it: its example preset, unchanged, on the data it names."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own task: one preset file") :]
    example = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    preset = load_preset(write_preset(tmp_path, example))
    held_out = write_sklearn_csvs(tmp_path / "data" / preset.data.dataset, "iris")
    summary = run_sweep(tmp_path, write_preset(tmp_path, example), "--n-trials", "2")
    submission = pd.read_csv(summary["submission"])
    assert list(submission.columns) == ["id", "species"] and submission["id"].tolist() == held_out.index.tolist()
    assert (submission["species"].to_numpy() == held_out.to_numpy()).mean() > 0.8
    # its boosted trees were fitted on the sweep's folds and weighed in the study's ensemble
    assert summary["ensemble"]["estimators"] == ["boosting"] and summary["estimators"]["boosting"]["cv_acc"] > 0.8


@pytest.mark.slow
def test_a_public_table_is_written_swept_and_scored_beside_the_baselines(tmp_path, capsys):
    """``experiments/tools/tables.py``: penguins from its pinned wheel, the shipped preset's sweep,
    and every model's held-out accuracy, the baselines' fitted on the same training rows."""
    sys.path.insert(0, str(REPO / "experiments" / "tools"))
    import tables

    data = tmp_path / "data"
    assert tables.main(["--data-dir", str(data), "write", "penguins"]) == 0
    train_rows, test_rows, held_out = (pd.read_csv(data / "penguins" / f) for f in tables.FILES)
    assert (len(train_rows), len(test_rows)) == (258, 86) and "species" not in test_rows
    assert held_out.columns.tolist() == ["id", "species"] and held_out["id"].tolist() == test_rows["id"].tolist()
    assert not set(train_rows["id"]) & set(test_rows["id"])
    summary = run_sweep(tmp_path, preset_path("penguins"), "--n-trials", "2", "--n-jobs", "1")
    scores = tables.score("penguins", data, [tmp_path / "out"])
    assert list(scores) == [
        "HistGradientBoosting",
        "logistic regression",
        f"out: best trial ({summary['best_trial']})",
        "out: estimator boosting",
        "out: submission (the study's ensemble)",
    ]
    assert scores["HistGradientBoosting"] > 0.9 and scores["logistic regression"] > 0.9
    submission = pd.read_csv(summary["submission"])
    assert scores["out: submission (the study's ensemble)"] == (submission["species"] == held_out["species"]).mean()
    assert tables.main(["--data-dir", str(data), "score", "penguins", str(tmp_path / "out")]) == 0
    assert "out: submission (the study's ensemble)" in capsys.readouterr().out
    assert tables.main(["--data-dir", str(tmp_path / "nowhere"), "score", "penguins"]) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("in_shape", [(20,), (1, 28, 28), (3, 12, 12)])
def test_the_readmes_own_model_takes_table_rows_and_images(tmp_path, in_shape):
    """The module of the README's "Your own model", as written, on one sample shape of each data kind."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Your own model") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(
        compile(code.replace('"my-net"', f'"readme-net-{len(in_shape)}-{in_shape[-1]}"'), "README.md", "exec"),
        namespace,
    )
    model = namespace["MyNet"](in_shape, 3)
    assert model(torch.randn(5, *in_shape)).shape == (5, 3)
