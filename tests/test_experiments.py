"""train.py and sweep.py end to end on House Prices, shrunk: MLflow hierarchy, resume, pruning, bad flags."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from project.artifacts.submission import SubmissionFormat, check_submission
from project.sweep.study import Objective, SweepSettings
from project.tracking.tracker import Tracker
from project.utils.devices import describe, training_device

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(REPO / "experiments" / "tools"))
import sweep  # noqa: E402
import train  # noqa: E402

from tests.servers import free_port  # noqa: E402

TINY = ["--folds", "2", "--max-epochs", "2", "--batch-size", "64"]
# what Kaggle accepts for House Prices: Id 1461..2919 ascending, a positive SalePrice each
KAGGLE = SubmissionFormat("Id", ("SalePrice",), np.arange(1461, 2920), (1461, 2919), positive=True)


def two_fold_preset() -> dict:
    from project.config import preset_path
    from project.validate import load_preset

    return load_preset(preset_path("house-prices"), ["folds=2"]).resolved()


def common(tmp_path: Path) -> list[str]:
    return ["--output-dir", str(tmp_path / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]


@pytest.mark.slow
def test_train_logs_run_and_is_deterministic(real_data, tmp_path):
    args = ["--data-dir", str(real_data), *TINY, "--hidden-sizes", "16", *common(tmp_path)]
    assert train.main(args) == 0
    first = json.loads((tmp_path / "out/summary.json").read_text())
    assert train.main(args) == 0
    second = json.loads((tmp_path / "out/summary.json").read_text())
    assert abs(first["cv_mean"] - second["cv_mean"]) < 1e-6 and len(first["fold_scores"]) == 2
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(first["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["cv_mean"] == pytest.approx(first["cv_mean"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/rmse/fold_0")] == [0, 1]
    check_submission(pd.read_csv(first["submission"]), KAGGLE)


@pytest.mark.slow
def test_sweep_hierarchy_resume_and_submission(real_data, tmp_path):
    args = ["--data-dir", str(real_data), *TINY, "--n-trials", "2", "--n-jobs", "1", *common(tmp_path)]
    assert sweep.main(args) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["n_trials"] == 2 and summary["study"]["name"] == "house-prices"
    frame = pd.read_csv(summary["submission"])
    check_submission(frame, KAGGLE)
    assert len(frame) == 1459

    # the same command again resumes the study
    assert sweep.main(args) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["n_trials"] == 4

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # the preset's estimators: one run each, which the resumed study's export logged to again
    estimators = [c for c in children if c.data.tags.get("kind") == "estimator"]
    assert sorted(c.info.run_name for c in estimators) == ["estimator-boosting", "estimator-lasso"]
    children = [c for c in children if c not in estimators]
    assert len(children) == 4 >= summary["n_complete"]
    assert {c.data.tags["trial_number"] for c in children} == {"0", "1", "2", "3"}
    assert {c.data.tags["device"] for c in children} == {describe(training_device())}  # where each trained
    assert sum(c.data.tags.get("best_trial") == "true" for c in children) >= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.json", "submission.csv", "plots"} <= artifacts
    # the best model: a logged model of the study's run, registered once per export (v2 after the resume)
    name, version = summary["registered_model"].removeprefix("models:/").split("/")
    assert (name, version) == ("house-prices", "2")
    assert client.get_model_version(name, version).run_id == parent.info.run_id


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


@pytest.mark.slow
def test_pruned_trial_is_pruned_in_optuna_and_not_failed_in_mlflow(real_data, tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "prune-test")
    parent = tracker.start_run("study")
    settings = SweepSettings(
        preset=two_fold_preset(),
        data_dir=str(real_data),
        seed=0,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="p",
        tracking_uri=tracker.tracking_uri,
        experiment_name="prune-test",
        fixed={"max_epochs": 3, "model.hidden_sizes": (8,)},
        parent_run_id=parent,
    )
    study = optuna.create_study(storage=settings.storage, study_name="p", pruner=AlwaysPrune())
    study.optimize(Objective(settings, tracker), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = tracker.client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "PRUNED"
    assert run.data.tags["mlflow.parentRunId"] == parent


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--folds", "1", "argument --folds"),
        ("--n-trials", "0", "argument --n-trials"),
        ("--task", "nope", "argument --task"),
        ("--max-epochs", "-1", "argument --max-epochs"),
        ("--dropout", "1.5", "argument --dropout"),
        ("--lr", "-0.1", "argument --lr"),
        ("--weight-decay", "-1", "argument --weight-decay"),
        ("--storage", "redis://localhost", "argument --storage"),
        ("--output-dir", "/dev/null/out", "argument --output-dir"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([flag, value, *(common(tmp_path) if flag != "--output-dir" else [])])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_corrupt_train_csv_is_refused_naming_the_file(house_dir, tmp_path, capsys):
    (house_dir / "house-prices/train.csv").write_text("Id,SalePrice\n1,abc\n")
    code = train.main(["--data-dir", str(house_dir), *TINY, *common(tmp_path)])
    assert code == 1
    assert "train.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_mlflow_server_serves_the_runs(tmp_path):
    """What `mlflow ui` shows: a server on 127.0.0.1 over the same store returns our runs by REST."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "served")
    run_id = tracker.start_run("study")
    tracker.log_metrics(run_id, {"cv_mean": 0.123})
    tracker.end_run(run_id)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        body = json.dumps({"experiment_ids": [tracker.experiment_id]}).encode()
        deadline, reply = time.monotonic() + 90, None
        while reply is None and time.monotonic() < deadline:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                reply = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(1)
        assert reply is not None, "mlflow server did not answer within 90 s"
        runs = reply["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        assert {m["key"]: m["value"] for m in runs[0]["data"]["metrics"]}["cv_mean"] == pytest.approx(0.123)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_diverged_trial_is_failed_with_its_reason_and_the_sweep_goes_on(real_data, tmp_path, monkeypatch):
    from project.cv import TrainingDiverged
    from project.sweep import study as study_module

    real_cv, calls = study_module.cross_validate, []

    def diverge_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise TrainingDiverged(1, 3)
        return real_cv(*args, **kwargs)

    monkeypatch.setattr(study_module, "cross_validate", diverge_first)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "nan-test")
    settings = SweepSettings(
        preset=two_fold_preset(),
        data_dir=str(real_data),
        seed=0,
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        study_name="n",
        tracking_uri=tracker.tracking_uri,
        experiment_name="nan-test",
        fixed={"max_epochs": 2, "model.hidden_sizes": (8,)},
    )
    study = optuna.create_study(storage=settings.storage, study_name="n")
    study.optimize(Objective(settings, tracker), n_trials=2, catch=(TrainingDiverged,))
    first, second = study.trials
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs["failure"] == "training loss became NaN or infinite on fold 1 at epoch 3"
    assert second.state == optuna.trial.TrialState.COMPLETE
    run = tracker.client.get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "fold 1 at epoch 3" in run.data.tags["failure"]


@pytest.mark.slow
def test_kaggle_credentials_never_reach_mlflow(real_data, tmp_path, monkeypatch):
    secret = "kaggle-secret-0123456789"
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", secret)
    assert train.main(["--data-dir", str(real_data), *TINY, "--hidden-sizes", "8", *common(tmp_path)]) == 0
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    run = client.get_run(summary["mlflow"]["run_id"])
    logged = json.dumps([run.data.params, run.data.tags])
    assert secret not in logged
    artifacts = [a for a in (tmp_path / "mlartifacts").rglob("*") if a.is_file()]
    assert {a.name for a in artifacts} >= {"model.pt", "summary.json", "submission.csv"}
    for artifact in artifacts:
        assert secret.encode() not in artifact.read_bytes(), artifact


def test_start_point_drops_what_flags_fix():
    from project.sweep.space import config_from_params, start_point
    from project.tasks import get_task

    task = get_task("fashion-mnist")
    assert start_point(task, "mlp", {}) == task.preset.models["mlp"].start
    point = start_point(task, "mlp", {"model.hidden_sizes": (64,), "lr": 0.01})
    assert not {"depth", "width", "dropout", "lr"} & set(point)
    config = config_from_params(task, "mlp", start_point(task, "mlp", {}), {})
    assert config.model_kwargs["hidden_sizes"] == (1024, 1024) and config.model_kwargs["dropout"] == 0.3
    cnn = config_from_params(task, "cnn", start_point(task, "cnn", {}), {})
    assert cnn.model == "cnn" and cnn.model_kwargs["channels"] == (24, 48)


@pytest.mark.parametrize("embedding", ["plr", "none"])
def test_a_setting_searched_when_another_is_set_is_not_searched_beside_none(embedding):
    """``when: model.numeric_embedding``: the embedding's scale is searched beside an embedding only."""
    from project.config import preset_path
    from project.sweep.space import suggest_config
    from project.tasks import Task
    from project.validate import load_preset

    task = Task(load_preset(preset_path("diamonds"), [f"models.mlp.args.numeric_embedding={embedding}"]))
    trial = optuna.create_study().ask()
    config = suggest_config(trial, task, "mlp", {})
    assert config.model_kwargs["numeric_embedding"] == embedding
    assert ("embedding_scale" in trial.params) == (embedding != "none")
    assert {"lr", "weight_decay", "depth"} <= set(trial.params)


def test_logged_cv_reads_back_as_it_was_logged(tmp_path):
    """Image sweeps draw the best trial's curves from its MLflow run instead of training it again:
    the curves a fit's RunLogger wrote while it trained (as Lightning hands them over, the epoch
    among the metrics), and the scores log_cv wrote after."""
    from project.cv import CVResult
    from project.tracking.logger import RunLogger

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "read-back")
    history = [[{"epoch": e, "train_loss": 1.0 / (e + 1), "val_acc": 0.5 + e / 10} for e in range(3)]]
    result = CVResult("acc", [0.7], history, 2.5)
    run_id = tracker.start_run("trial-0")
    logger = RunLogger(tracker, run_id, "trial-0", "fold_3")
    for record in history[0]:
        logged = {"train/loss/fold_3": record["train_loss"], "val/acc/fold_3": record["val_acc"]}
        logger.log_metrics({**logged, "epoch": record["epoch"]}, step=7 * record["epoch"])
    logger.finalize("success")
    tracker.log_cv(run_id, result, [3])
    back = tracker.read_cv(run_id, [3], "acc")
    assert back.fold_scores == [0.7] and back.history == history
    assert tracker.read_cv(run_id, [4], "acc") is None  # a fold it never logged
    assert tracker.read_cv("0" * 32, [3], "acc") is None  # a run this store does not hold


@pytest.mark.slow
def test_baselines_score_the_sweep_folds(real_data, tmp_path, capsys):
    import baselines

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert baselines.main(["--data-dir", str(real_data), "--models", "boosting,lasso", "--tracking-uri", uri]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["boosting", "lasso"]
    for row in rows:
        cv, _, pooled, err_1299, err_524 = map(float, row.split()[1:6])
        assert 0.10 < pooled < cv < 0.14 and err_1299 > 1 and err_524 > 1  # the two partial sales
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("house-prices-baselines")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["boosting", "lasso"]
    assert all(r.info.status == "FINISHED" and 0.10 < r.data.metrics["cv_mean"] < 0.14 for r in runs)


@pytest.mark.slow
def test_plain_reference_times_the_d2l_loop_on_the_project_folds(real_data, tmp_path, capsys):
    import plain_reference

    out = tmp_path / "plain.json"
    assert (
        plain_reference.main(
            ["--data-dir", str(real_data), "--cases", "house-prices-5fold-linear", "--repeats", "2", "--json", str(out)]
        )
        == 0
    )
    (case,) = json.loads(out.read_text())["cases"]
    assert case["name"] == "house-prices-5fold-linear" and len(case["runs_s"]) == 2 and case["plain_s"] > 0
    with pytest.raises(SystemExit) as exit_info:
        plain_reference.main(["--cases", "house-prices-mlp"])
    assert exit_info.value.code == 2 and "argument --cases: unknown ['house-prices-mlp']" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_keeps_the_cases_it_measured_when_the_data_is_bad(real_data, tmp_path, capsys):
    import benchmark

    (tmp_path / "fashion-mnist").symlink_to(real_data / "fashion-mnist")
    (tmp_path / "house-prices").mkdir()
    lines = (real_data / "house-prices/train.csv").read_text().splitlines(keepends=True)
    (tmp_path / "house-prices/train.csv").write_text("".join(lines[:100]))  # truncated
    out = tmp_path / "bench.json"
    assert (
        benchmark.main(
            [
                "--data-dir",
                str(tmp_path),
                "--cases",
                "fashion-mnist-epoch,house-prices-5fold-linear",
                "--repeats",
                "1",
                "--json",
                str(out),
            ]
        )
        == 1
    )
    assert [case["name"] for case in json.loads(out.read_text())["cases"]] == ["fashion-mnist-epoch"]
    assert "house-prices/train.csv: checksum mismatch" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_measures_the_sweeps_throughput(real_data, tmp_path):
    import benchmark

    out = tmp_path / "bench.json"
    assert (
        benchmark.main(
            ["--data-dir", str(real_data), "--cases", "sweep-throughput", "--sweep-trials", "2", "--json", str(out)]
        )
        == 0
    )
    (case,) = json.loads(out.read_text())["cases"]
    assert case["name"] == "sweep-throughput" and case["plain_s"] > 0 and case["project_s"] > 0
    # trials a minute are rounded to a tenth: within that of the seconds' own rate, however slow the machine
    assert case["project_trials_per_min"] == pytest.approx(120 / case["project_s"], abs=0.05 + 1e-9)


@pytest.mark.parametrize("script", ["sweep.py", "train.py", "export_submission.py"])
def test_help_imports_none_of_the_heavy_libraries(script):
    """``--help`` answers at once: the parser is built from the presets' names alone, and torch,
    Lightning, Optuna and MLflow (seconds to import) are imported by what runs after it."""
    path = REPO / "experiments" / script
    probe = (
        f"import runpy, sys\nsys.argv = [{str(path)!r}, '--help']\n"
        f"try:\n    runpy.run_path({str(path)!r}, run_name='__main__')\nexcept SystemExit as exit:\n"
        "    assert exit.code in (0, None), exit.code\n"
        "print(sorted(m for m in ('torch', 'lightning', 'optuna', 'mlflow') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:]


def test_image_recipe_scores_one_validation_fold_with_and_without_mirror_averaging(tmp_path, capsys):
    """``image_recipe.py``: the preset's configuration with ``--set`` changes, on one validation
    fold; a sweep's first trial on that fold would score the same."""
    import image_recipe

    from tests.conftest import write_idx_set

    write_idx_set(tmp_path / "tiny-images", n_train=100, n_test=20)
    small = ["data.dataset=tiny-images", "models.cnn.args.channels=[4,8]", "models.cnn.args.hidden=16"]
    sets = [arg for value in small for arg in ("--set", value)]
    out = tmp_path / "recipe.jsonl"
    argv = ["--data-dir", str(tmp_path), "--max-epochs", "2", "--batch-size", "16", "--fold", "1", *sets]
    assert image_recipe.main([*argv, "--json", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["fold"] == 1 and printed["overrides"] == small and len(printed["curve"]) == 2
    assert printed["curve"][-1] == round(printed["val_acc"], 4)
    assert 0 <= printed["val_acc_mirror_averaged"] <= 1 and printed["seconds"] >= 0
    with pytest.raises(SystemExit) as refused:
        image_recipe.main(["--task", "house-prices"])
    assert refused.value.code == 2 and "expected an image task" in capsys.readouterr().err


def test_conv_steps_times_each_net_in_each_setting(capsys):
    import conv_steps

    assert conv_steps.main(["--batch-size", "8", "--steps", "1", "--repeats", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row[:42].strip() for row in rows] == list(conv_steps.NETS)
    assert all(len(row[42:].split()) == 3 and min(map(float, row[42:].split())) > 0 for row in rows)
