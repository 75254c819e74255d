"""MLflow as its users expect, on a small finished House Prices sweep: the registered model, loaded by
its models:/ URI in a fresh process and served over HTTP, gives the submission's prices; runs
carry their datasets and source; optuna-dashboard serves the study; long fits show progress."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import sweep  # noqa: E402

from tests.servers import free_port, wait_for_http  # noqa: E402


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """Three trials of a 2-fold House Prices sweep (short fits), its store and outputs."""
    if not (REPO / "data" / "house-prices" / "train.csv").is_file():
        pytest.skip("real data not fetched: run `make data`")
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = [
        "--folds",
        "2",
        "--max-epochs",
        "3",
        "--n-trials",
        "3",
        "--n-jobs",
        "1",
        "--output-dir",
        str(root / "out"),
        "--tracking-uri",
        uri,
    ]
    assert sweep.main(args) == 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    return {"root": root, "uri": uri, "summary": summary}


@pytest.mark.slow
def test_registered_model_reproduces_the_submission_in_a_fresh_process(finished_sweep):
    summary, uri = finished_sweep["summary"], finished_sweep["uri"]
    assert summary["registered_model"] == "models:/house-prices/1"
    client = MlflowClient(uri)
    version = client.get_model_version("house-prices", "1")
    assert version.tags["study"] == "house-prices" and int(version.tags["trial"]) == summary["best_trial"]
    assert float(version.tags["cv_rmse"]) == pytest.approx(summary["cv_mean"])
    code = (
        "import mlflow, pandas as pd, sys; "
        "model = mlflow.pyfunc.load_model('models:/house-prices/latest'); "
        f"model.predict(pd.read_csv({str(REPO / 'data/house-prices/test.csv')!r})).to_csv(sys.stdout, index=False)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    predicted = pd.read_csv(io.StringIO(out.stdout))
    submitted = pd.read_csv(summary["submission"])
    assert predicted["Id"].tolist() == submitted["Id"].tolist()
    np.testing.assert_allclose(predicted["SalePrice"], submitted["SalePrice"], rtol=1e-6)


@pytest.mark.slow
def test_served_model_answers_invocations_with_the_submissions_prices(finished_sweep):
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/house-prices/latest",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        # it starts uvicorn by name: the environment's bin folder on PATH, as activating it does
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": finished_sweep["uri"],
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, 180)
        rows = pd.read_csv(REPO / "data/house-prices/test.csv").iloc[:7]
        body = json.dumps({"dataframe_split": json.loads(rows.to_json(orient="split", index=False))}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    submitted = pd.read_csv(finished_sweep["summary"]["submission"]).iloc[:7]
    assert [row["Id"] for row in answer] == submitted["Id"].tolist()
    np.testing.assert_allclose([row["SalePrice"] for row in answer], submitted["SalePrice"], rtol=1e-6)


@pytest.mark.slow
def test_runs_carry_their_datasets_and_source(finished_sweep):
    client = MlflowClient(finished_sweep["uri"])
    experiment = client.get_experiment_by_name("house-prices")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    runs = client.search_runs([experiment.experiment_id])
    # the study, its three trials and the preset's two estimators
    assert sorted(r.info.run_name for r in runs) == [
        "estimator-boosting",
        "estimator-lasso",
        "study-house-prices",
        "trial-0",
        "trial-1",
        "trial-2",
    ]
    for run in runs:
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert set(inputs) == {"house-prices/train.csv", "house-prices/test.csv"}
        contexts = {name: {t.key: t.value for t in d.tags}["mlflow.data.context"] for name, d in inputs.items()}
        assert contexts == {"house-prices/train.csv": "training", "house-prices/test.csv": "testing"}
        assert json.loads(inputs["house-prices/train.csv"].dataset.source)["uri"] == str(
            REPO / "data/house-prices/train.csv"
        )
        assert inputs["house-prices/train.csv"].dataset.profile == '{"num_rows": 1460, "num_elements": 118260}'
        assert run.data.tags["mlflow.source.name"] == "experiments/sweep.py"  # the script that made it
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    study_run = client.get_run(finished_sweep["summary"]["mlflow"]["run_id"])
    assert {a.path for a in client.list_artifacts(study_run.info.run_id)} >= {
        "preset.yaml",
        "submission.csv",
        "summary.json",
        "plots",
    }
    (logged,) = client.search_logged_models([experiment.experiment_id])
    assert logged.source_run_id == study_run.info.run_id and logged.name == "model"


@pytest.mark.slow
def test_optuna_dashboard_serves_the_study(finished_sweep):
    port = free_port()
    storage = finished_sweep["summary"]["study"]["storage"]
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        studies = json.loads(wait_for_http(f"http://127.0.0.1:{port}/api/studies", dashboard, 60))
    finally:
        os.killpg(dashboard.pid, 15)
        dashboard.wait(timeout=30)
    (study,) = studies["study_summaries"]
    assert study["study_name"] == "house-prices" and study["directions"] == ["minimize"]


def test_a_long_fit_shows_a_line_per_epoch_at_most_every_few_seconds(house_dir):
    from project.config import TrainConfig
    from project.cv import cross_validate
    from project.engine.progress import EpochProgress
    from tests.conftest import house_task_dm

    task, dm = house_task_dm(house_dir)
    stream = io.StringIO()
    result = cross_validate(
        task,
        TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=2, batch_size=16),
        datamodule=dm,
        callbacks=[EpochProgress("fashion", after=0.0, every=0.0, stream=stream)],
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("fashion: epoch 2/2, train_loss ")
    assert f"val_rmse {result.mean:.4f}" in lines[1]
    stream = io.StringIO()  # epochs far shorter than `every`: the last one alone
    cross_validate(
        task,
        TrainConfig(model_kwargs={"hidden_sizes": (8,)}, max_epochs=3, batch_size=16),
        datamodule=dm,
        callbacks=[EpochProgress("fashion", after=0.0, every=3600.0, stream=stream)],
    )
    assert [line.split(",")[0] for line in stream.getvalue().splitlines()] == ["fashion: epoch 3/3"]


CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; .ci/run installs it


def grid_rows(page) -> dict[str, str]:
    """The runs table by run name: its grid draws a row's pinned and scrolling parts as two elements."""
    parts: dict[str, list[str]] = {}
    rows = page.locator(".ag-row")
    for i in range(rows.count()):
        parts.setdefault(rows.nth(i).get_attribute("row-id"), []).append(rows.nth(i).inner_text())
    joined = ["\n".join(text) for text in parts.values()]
    return {
        next(line for line in text.splitlines() if line.startswith(("study-", "trial-", "estimator-"))): text
        for text in joined
    }


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_study_as_a_person_sees_it(finished_sweep, tmp_path):
    """A real browser on `mlflow server` over the sweep's store: the study's run with its trials
    and estimators nested, their Dataset, Source and Models columns, each fold's curves in the chart view, and
    the registered model. Screenshots go to $UI_SCREENSHOTS (the README's come from here)."""
    if not CHROMIUM.exists():
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("UI_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            finished_sweep["uri"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    experiment_id = finished_sweep["summary"]["mlflow"]["experiment_id"]
    base = f"http://127.0.0.1:{port}/#"
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, 120)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 820})
            page.set_default_timeout(60_000)
            # the link the sweep prints opens the experiment in the model-training view
            page.goto(f"{base}/experiments/{experiment_id}/runs?workflowType=machine_learning")
            study = page.locator(".ag-cell").filter(has_text="study-house-prices").first
            study.wait_for()
            page.get_by_role("button", name="Close").click()  # the assistant's side panel
            study.locator("button").first.click()  # expand: the trials are nested under the study
            for name in ("trial-0", "trial-1", "trial-2", "estimator-lasso", "estimator-boosting"):
                page.get_by_text(name, exact=True).wait_for()
            rows = grid_rows(page)  # run name -> the text of its whole row
            assert sorted(rows) == [
                "estimator-boosting",
                "estimator-lasso",
                "study-house-prices",
                "trial-0",
                "trial-1",
                "trial-2",
            ]
            for name, text in rows.items():
                assert "house-prices/train.csv" in text and "sweep.py" in text, (name, text)  # Dataset, Source
            assert "house-prices v1" in " ".join(rows["study-house-prices"].split())  # Models: the registered version
            page.screenshot(path=shots / "mlflow-runs.png")

            page.goto(f"{base}/experiments/{experiment_id}/runs?workflowType=machine_learning&compareRunsMode=CHART")
            page.get_by_text("trial-0", exact=True).first.wait_for()  # the study stays expanded in the run list
            for fold in range(2):
                for name in (f"val/rmse/fold_{fold}", f"train/loss/fold_{fold}"):
                    # the charts of other metrics (each fold's, their means) push it out of view, where
                    # the page draws nothing: its search box brings it up, as a person would
                    page.get_by_placeholder("Search metric charts").fill(name)
                    card = page.locator("[data-testid^='experiment-view-compare-runs-card']").filter(
                        has=page.get_by_text(name, exact=True)
                    )
                    # a trial's curve on that chart, named in its legend
                    card.get_by_text(re.compile(rf"trial-\d \({re.escape(name)}\)")).first.wait_for()

            page.goto(f"{base}/models/house-prices?workflowType=machine_learning")
            page.get_by_text("Version 1", exact=True).wait_for()
            assert page.get_by_text("cv_rmse").is_visible() and page.get_by_text("study").first.is_visible()
            page.screenshot(path=shots / "mlflow-model.png")
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert all((shots / name).stat().st_size > 10_000 for name in ("mlflow-runs.png", "mlflow-model.png"))
