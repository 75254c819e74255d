"""Files written whole or not at all, the trials' kept fold models reused by the export, damaged
files recovered, and a full disk said in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sqlalchemy
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from project.artifacts.predictor import ModelUnreadable, load_predictor
from project.ensemble.selection import Predictions, blend
from project.utils import files
from tests.test_reliability import REPO, SWEEP, sweep_args, trials

EXPORT = [sys.executable, str(REPO / "experiments" / "export_submission.py")]


def test_a_write_that_fails_leaves_the_earlier_file_and_no_temporary_one(tmp_path):
    path = files.write_text(tmp_path / "summary.json", "{}", "the summary")
    with pytest.raises(RuntimeError), files.atomic_path(path, "the summary") as tmp:
        tmp.write_text('{"half": ')
        raise RuntimeError("stopped mid-write")
    assert path.read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_full_disk_is_named_with_the_path_and_what_was_written(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    with files.atomic_folder(folder, "the model") as tmp:
        (tmp / "model.pt").write_text("the first model")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(files.WriteFailed) as raised, files.atomic_folder(folder, "the model") as tmp:
        (tmp / "inputs.json").write_text("{}")
        full()
    assert str(raised.value) == f"cannot write the model to {folder}: No space left on device"
    # the earlier folder stands whole, and the new one's files are gone
    assert (folder / "model.pt").read_text() == "the first model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(files.WriteFailed, match=r"cannot write trial 3's kept predictions to .*trial-3.npz"):
        Predictions(np.arange(2), np.zeros(2, int), np.zeros(2)).save(
            tmp_path / "trial-3.npz", "trial 3's kept predictions"
        )


SLOW_WRITER = """
import pathlib, sys, time
import numpy as np
from project.ensemble.selection import Predictions

def slow(self, data):  # the disk takes its time: half of the file, then a long pause
    with open(self, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        print("writing", flush=True)
        time.sleep(60)
        handle.write(data[len(data) // 2 :])

pathlib.Path.write_bytes = slow
rows = np.arange(100_000)
Predictions(rows, rows % 5, np.ones(len(rows))).save(pathlib.Path(sys.argv[1]))
"""


def test_a_kill_9_during_a_kept_files_write_leaves_no_file_under_its_name(tmp_path):
    path = tmp_path / "predictions" / "trial-0.npz"
    earlier = Predictions(np.arange(3), np.zeros(3, int), np.zeros(3))
    earlier.save(path)
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
        half = [p for p in path.parent.iterdir() if p.name != path.name]
        assert len(half) == 1 and half[0].name.startswith(".trial-0.npz.") and half[0].stat().st_size > 0
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    # the final name holds the earlier, whole file; the half-written one never took it
    assert np.array_equal(Predictions.load(path).rows, earlier.rows)
    path.unlink()
    writer = subprocess.Popen(
        [sys.executable, "-c", SLOW_WRITER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert not path.exists()


def test_a_torn_last_line_of_the_mlflow_journal_is_dropped(tmp_path):
    from project.tracking.journal import _entries

    journal = tmp_path / "1-abc.jsonl"
    journal.write_text('{"op": "update_run", "args": {"run": "r1"}}\n{"op": "set_termi')
    assert _entries(journal) == [{"op": "update_run", "args": {"run": "r1"}}]
    journal.write_text('{"op": "upd\n{"op": "update_run", "args": {"run": "r1"}}\n')
    with pytest.raises(json.JSONDecodeError):  # only the last line can be torn: anything else is no journal
        _entries(journal)


def small_sweep(real_data: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [*sweep_args(real_data, tmp_path, "--n-trials", "3", "--n-jobs", "1", "--no-pruning"), *extra]
    return subprocess.run([*SWEEP, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def export(real_data: Path, tmp_path: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *EXPORT,
            "--output-dir",
            str(out),
            "--data-dir",
            str(real_data),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--ensemble",
            "trials",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_export_loads_the_trials_fold_models_and_recovers_damaged_files(real_data, tmp_path, monkeypatch):
    sweep = small_sweep(real_data, tmp_path, "--ensemble", "trials")
    assert sweep.returncode == 0, sweep.stderr[-2000:]
    # what it printed is its own: no INFO line of MLflow's or Optuna's
    assert not [
        line for line in (sweep.stdout + sweep.stderr).splitlines() if " INFO " in line or line.startswith("[I ")
    ]
    out = tmp_path / "out"
    study = {t.number: t for t in trials(f"sqlite:///{out / 'optuna.db'}") if t.state == TrialState.COMPLETE}
    assert len(study) == 3
    for trial in study.values():  # each kept file, with the checksum of what was written
        for attr in ("predictions", "fold_models"):
            assert files.file_sha256(Path(trial.user_attrs[attr])) == trial.user_attrs[f"{attr}_sha256"]
    summary = json.loads((out / "summary.json").read_text())
    members = {m["trial"]: m["weight"] for m in summary["ensemble"]["members"]}

    # the export trains nothing: it loads what the trials kept, and predicts what they predicted
    sys.path.insert(0, str(REPO / "experiments"))
    import export_submission

    from project.sweep import kept

    def no_training(*args, **kwargs):
        raise AssertionError("the export trained a trial again")

    monkeypatch.setattr(kept, "cross_validate", no_training)
    assert (
        export_submission.main(
            [
                "--output-dir",
                str(out),
                "--data-dir",
                str(real_data),
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                "--ensemble",
                "trials",
            ]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["cv_mean_rerun"] is None
    test = pd.read_csv(real_data / "house-prices" / "test.csv")
    library = {n: Predictions.load(out / "predictions" / f"trial-{n}.npz") for n in study}
    model = load_predictor(out / "model")
    np.testing.assert_allclose(model.averaged(test).numpy(), blend(library, members, "test"), rtol=1e-5)
    monkeypatch.undo()

    # damaged files: a kept predictions file cut to a third, one rewritten whole but not as it was
    # written, and the best trial's fold models (always read: its curves are plotted) cut to a third
    best = summary["best_trial"]
    first, second = [n for n in sorted(study) if n != best][:2]
    cut = Path(study[first].user_attrs["predictions"])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 3])
    altered = Predictions.load(out / "predictions" / f"trial-{second}.npz")
    Predictions(altered.rows, altered.folds, altered.oof + 1, altered.test).save(
        out / "predictions" / f"trial-{second}.npz"
    )
    weights = Path(study[best].user_attrs["fold_models"])
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    again = export(real_data, tmp_path, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    lines = again.stderr.splitlines()
    assert any(
        line.startswith(f"trial {first}'s kept predictions {cut} cannot be read (BadZipFile")
        and line.endswith("fetched again from its MLflow run")
        for line in lines
    ), again.stderr
    assert any(
        line.startswith(f"trial {second}'s kept predictions")
        and "SHA-256 is not the one recorded" in line
        and line.endswith("fetched again from its MLflow run")
        for line in lines
    ), again.stderr
    assert any(
        line.startswith(f"trial {best}'s fold models {weights} cannot be read (")
        and line.endswith("fetched again from its MLflow run")
        for line in lines
    ), again.stderr
    # the recovered files are whole again, and the ensemble is the same
    for number, attr in ((first, "predictions"), (second, "predictions"), (best, "fold_models")):
        path = Path(study[number].user_attrs[attr])
        assert files.file_sha256(path) == study[number].user_attrs[f"{attr}_sha256"]
    assert json.loads((out / "summary.json").read_text())["ensemble"]["members"] == summary["ensemble"]["members"]
    np.testing.assert_allclose(
        load_predictor(out / "model").averaged(test).numpy(), blend(library, members, "test"), rtol=1e-5
    )

    # fold models gone from the disk and from the trial's MLflow run: trained again, with a line
    weights.unlink()
    for copy in (tmp_path / "mlartifacts").rglob(f"models/{weights.name}"):
        copy.unlink()
    again = export(real_data, tmp_path, out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        f"trial {best}'s fold models {weights} is missing: training trial {best} again to rebuild it"
        in again.stderr.splitlines()
    )
    assert json.loads((out / "summary.json").read_text())["cv_mean_rerun"] == pytest.approx(study[best].value)
    np.testing.assert_allclose(
        load_predictor(out / "model").averaged(test).numpy(), blend(library, members, "test"), rtol=1e-5
    )

    # a saved model whose weights are cut is named, with what writes it again
    model_file = next((out / "model").rglob("model.pt"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    with pytest.raises(
        ModelUnreadable, match=rf"cannot read the saved model's file {model_file} .*export_submission.py"
    ):
        load_predictor(out / "model")


def mount_tmpfs(folder: Path, options: str) -> None:
    """A tmpfs at ``folder``, which only root can mount (as CI runs); the test is skipped elsewhere."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB filesystem."""
    mount_tmpfs(tmp_path / "small", "size=24m")
    yield tmp_path / "small"
    subprocess.run(["umount", "-l", str(tmp_path / "small")], check=False)


@pytest.fixture
def read_only_disk(tmp_path):
    mount_tmpfs(tmp_path / "read-only", "ro,size=1m")
    yield tmp_path / "read-only"
    subprocess.run(["umount", "-l", str(tmp_path / "read-only")], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the filesystem holding ``folder`` has no room left."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * (1 << 20))
                handle.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


@pytest.mark.slow
def test_a_disk_that_fills_mid_sweep_is_one_line_and_the_export_finishes_once_there_is_room(
    real_data, tmp_path, small_disk
):
    out = small_disk / "out"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    args = [
        *sweep_args(real_data, tmp_path, "--n-trials", "6", "--n-jobs", "2", "--no-pruning", "--storage", storage),
        "--output-dir",
        str(out),
    ]
    sweep = subprocess.Popen([*SWEEP, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300

    def first_trial_complete() -> bool:  # its kept files written
        try:
            return any(t.state == TrialState.COMPLETE for t in trials(storage))
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the study is not created yet
            return False

    while sweep.poll() is None and time.monotonic() < deadline and not first_trial_complete():
        time.sleep(0.05)
    filler = fill(small_disk)
    _stdout, stderr = sweep.communicate(timeout=600)
    assert sweep.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "OSError" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write ") and "No space left on device" in errors[0]
    assert "export_submission.py" in errors[0]
    assert "failed with" not in stderr  # Optuna's own lines of it: the command's line says it
    # the finished trials are kept, none left RUNNING; the study's run ended FAILED with the reason
    kept = trials(storage)
    assert any(t.state == TrialState.COMPLETE for t in kept) and not any(t.state == TrialState.RUNNING for t in kept)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    study_runs = [
        r
        for r in client.search_runs([client.get_experiment_by_name("house-prices").experiment_id])
        if r.data.tags.get("kind") == "study"
    ]
    assert len(study_runs) == 1 and study_runs[0].info.status == "FAILED"
    assert study_runs[0].data.tags["failure"].startswith("cannot write ")
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name], "a temporary file was left behind"

    # room again: the export writes the deliverables from the trials the study kept
    filler.unlink()
    finished = subprocess.run(
        [
            *EXPORT,
            "--output-dir",
            str(out),
            "--storage",
            storage,
            "--data-dir",
            str(real_data),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--ensemble",
            "trials",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len(pd.read_csv(out / "submission.csv")) == 1459
    assert load_predictor(out / "model") is not None


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import sweep

    folder = tmp_path / "file-not-folder"
    folder.write_text("")
    with pytest.raises(SystemExit) as raised:
        sweep.main(["--output-dir", str(folder / "out"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert raised.value.code == 2
    assert "argument --output-dir: cannot create" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, read_only_disk, capsys):
    sys.path.insert(0, str(REPO / "experiments"))
    import sweep

    with pytest.raises(SystemExit) as raised:
        sweep.main(["--output-dir", str(read_only_disk), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert raised.value.code == 2
    assert f"argument --output-dir: {read_only_disk} is not writable: Read-only file system" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()
