"""What each completed trial keeps, and how the export reads it back.

A completed trial keeps its out-of-fold (and test) predictions, from which the study's ensemble is
selected (``project/ensemble/selection.py``), and, where the submission is made of fold models (a task that
does not refit), its fold models: the stacked weights of its K members, their head, and its
curves. Both go to the output folder (``predictions/trial-<n>.npz``, ``models/trial-<n>.pt``),
written whole or not at all (``project/utils/files.py``), and to the trial's MLflow run as artifacts;
the trial records each file's path and SHA-256.

The export reads them back through ``KeptTrials``: a file that is missing, truncated, of the
wrong rows or folds, or whose checksum differs from the one recorded, is said in one line and
recovered: fetched again from the trial's MLflow run, else rebuilt by training the trial again
(the same seeds give the same models), else left out of the ensemble with the reason.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import optuna

from project.artifacts.model_io import members_of, model_record, read_record
from project.artifacts.predictor import Predictor, fits_state
from project.config import TrainConfig
from project.cv import CVResult, TrainingDiverged, cross_validate
from project.data import FoldDataModule
from project.ensemble.selection import Member, Predictions, out_of_fold
from project.sweep.recovery import RUN_ID_ATTR
from project.tasks import Task
from project.tracking.tracker import Tracker
from project.utils import files

T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """One kind of kept file: the trial attribute that records its path (and ``<attr>_sha256``),
    its folder in the output folder and in the run's artifacts, and its file name."""

    attr: str
    folder: str
    suffix: str
    what: str

    def path(self, out_dir: Path, number: int) -> Path:
        return Path(out_dir) / self.folder / f"trial-{number}{self.suffix}"


PREDICTIONS = Kind("predictions", "predictions", ".npz", "kept predictions")
MODELS = Kind("fold_models", "models", ".pt", "fold models")
# what reading a damaged file raises: NumPy's and zipfile's errors for an .npz, torch's for a .pt
DAMAGED = (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile)


class Unreadable(Exception):
    """A kept file that is not what was written: the reason."""


def keep_trial(
    trial: optuna.Trial,
    task: Task,
    config: TrainConfig,
    result: CVResult,
    datamodule: FoldDataModule,
    out_dir: Path,
    tracker: Tracker,
    run_id: str,
) -> None:
    """Write the completed trial's predictions and (for a task that does not refit) fold models,
    log them on its MLflow run, and record their paths and checksums on the trial."""
    kept = [(PREDICTIONS, out_of_fold(task, result, datamodule, with_test=not task.refits).to_bytes())]
    if not task.refits:
        kept.append((MODELS, fold_models(config, result, datamodule)))
    for kind, data in kept:
        path = files.write_bytes(kind.path(out_dir, trial.number), data, f"trial {trial.number}'s {kind.what}")
        tracker.log_artifact(run_id, path, kind.folder)
        trial.set_user_attr(kind.attr, str(path))
        trial.set_user_attr(f"{kind.attr}_sha256", files.sha256(data))


def fold_models(config: TrainConfig, result: CVResult, datamodule: FoldDataModule) -> bytes:
    """The kept fold models' file: the members' weights and head (``project/artifacts/model_io.py``), with
    the curves and fold scores of the fit."""
    net_state, head_state = fits_state(result.fits)
    return model_record(
        config,
        datamodule.sample_shape,
        datamodule.out_features,
        [fold for f in result.fits for fold in f.members.folds],
        net_state,
        head_state,
        history=result.history,
        fold_scores=result.fold_scores,
        seconds=result.seconds,
    )


class KeptTrials:
    """The completed trials' kept files, read back, checked against what the study recorded, and
    recovered where they cannot be read; each trial trained again at most once."""

    def __init__(
        self,
        task: Task,
        datamodule: FoldDataModule,
        tracker: Tracker,
        out_dir: Path,
        seed: int,
        stacking: str,
        config_of: Callable[[optuna.trial.FrozenTrial], TrainConfig],
    ) -> None:
        self.task, self.datamodule, self.tracker, self.out_dir = task, datamodule, tracker, Path(out_dir)
        self.seed, self.stacking, self.config_of = seed, stacking, config_of
        self.retrained: dict[int, CVResult] = {}
        self.left_out: dict[int, str] = {}  # trials whose predictions could not be had, and why

    def result(self, trial: optuna.trial.FrozenTrial) -> CVResult:
        """The trial's configuration trained again on the study's folds (deterministic: the same models)."""
        if trial.number not in self.retrained:
            self.retrained[trial.number] = cross_validate(
                self.task, self.config_of(trial), seed=self.seed, stacking=self.stacking, datamodule=self.datamodule
            )
        return self.retrained[trial.number]

    def predictions(self, trials: list[optuna.trial.FrozenTrial]) -> dict[Member, Predictions]:
        """The kept predictions of ``trials`` (those run before predictions were kept are skipped);
        a trial whose predictions cannot be had at all is left out, its reason in ``left_out``."""
        library: dict[Member, Predictions] = {}
        for trial in trials:
            if PREDICTIONS.attr not in trial.user_attrs:
                continue
            try:
                library[trial.number] = self._read(
                    trial, PREDICTIONS, self._check_predictions, self._rebuild_predictions
                )
            except (Unreadable, TrainingDiverged) as err:
                self.left_out[trial.number] = str(err)
                print(f"trial {trial.number} is left out of the ensemble: {err}", file=sys.stderr, flush=True)
        return library

    def predictor(self, trial: optuna.trial.FrozenTrial) -> tuple[Predictor, CVResult]:
        """The trial's fold models as a predictor, and its curves: loaded from its kept file,
        trained again where that cannot be read."""
        config, saved = self.config_of(trial), None
        if trial.number not in self.retrained:
            if MODELS.attr in trial.user_attrs:
                saved = self._read(trial, MODELS, self._check_models, self._rebuild_models)
            else:
                print(
                    f"trial {trial.number} kept no fold models (it ran before they were kept): training it again",
                    file=sys.stderr,
                    flush=True,
                )
        if saved is None:
            result = self.result(trial)
            return Predictor.from_fits(self.task, config, result.fits, self.datamodule), result
        members, _ = members_of(saved)
        predictor = Predictor.of_members(
            self.task, config, members, saved["head"], [self.datamodule.members], self.datamodule
        )
        return predictor, CVResult(
            self.task.metric, list(saved["fold_scores"]), saved["history"], float(saved["seconds"])
        )

    def _read(
        self,
        trial: optuna.trial.FrozenTrial,
        kind: Kind,
        check: Callable[[Path, str | None], T],
        rebuild: Callable[[optuna.trial.FrozenTrial, Path], T],
    ) -> T:
        """The trial's file of ``kind``: as kept, else its MLflow run's copy (which then replaces a
        damaged local one), else rebuilt."""
        path, expected = Path(trial.user_attrs[kind.attr]), trial.user_attrs.get(f"{kind.attr}_sha256")
        reason = "is missing"
        if path.is_file():
            try:
                return check(path, expected)
            except Unreadable as err:
                reason = f"cannot be read ({err})"
        where = f"trial {trial.number}'s {kind.what} {path}"
        run_id = trial.user_attrs.get(RUN_ID_ATTR)
        fetched = (
            self.tracker.download_artifact(
                run_id, f"{kind.folder}/{path.name}", self.out_dir / kind.folder / "downloaded"
            )
            if run_id
            else None
        )
        if fetched is not None:
            try:
                value = check(fetched, expected)
            except Unreadable as err:
                reason += f", and its MLflow run's copy cannot be read either ({err})"
            else:
                if reason != "is missing":  # a worker on another machine kept it there: nothing to say
                    print(f"{where} {reason}: fetched again from its MLflow run", file=sys.stderr, flush=True)
                    if path.parent.is_dir():
                        files.write_bytes(path, fetched.read_bytes(), f"trial {trial.number}'s {kind.what}")
                return value
        print(f"{where} {reason}: training trial {trial.number} again to rebuild it", file=sys.stderr, flush=True)
        return rebuild(trial, path)

    def _check_predictions(self, path: Path, expected: str | None) -> Predictions:
        try:
            predictions = Predictions.load(path)
        except DAMAGED as err:
            raise Unreadable(f"{type(err).__name__}: {err}") from None
        self._check_sum(path, expected)
        rows = np.sort(np.concatenate([r.numpy() for r in self.datamodule.members.val_rows]))
        if (
            not np.array_equal(predictions.rows, rows)
            or len(predictions.oof) != len(rows)
            or len(predictions.folds) != len(rows)
        ):
            raise Unreadable("its rows are not the validated rows of the study's folds")
        if not self.task.refits and (
            predictions.test is None or len(predictions.test) != len(self.datamodule.test_ids)
        ):
            raise Unreadable(f"it does not hold the {len(self.datamodule.test_ids)} test rows")
        return predictions

    def _check_models(self, path: Path, expected: str | None) -> dict:
        try:
            saved = read_record(path)
        except DAMAGED as err:
            raise Unreadable(f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}") from None
        self._check_sum(path, expected)
        folds = list(self.datamodule.members.folds)
        if saved.get("folds") != folds or "history" not in saved:
            raise Unreadable(f"its members are not the study's folds {folds}")
        return saved

    @staticmethod
    def _check_sum(path: Path, expected: str | None) -> None:
        if expected is not None and files.file_sha256(path) != expected:
            raise Unreadable("its SHA-256 is not the one recorded when it was written")

    def _rebuild_predictions(self, trial: optuna.trial.FrozenTrial, path: Path) -> Predictions:
        predictions = out_of_fold(self.task, self.result(trial), self.datamodule, with_test=not self.task.refits)
        if path.parent.is_dir():
            predictions.save(path, f"trial {trial.number}'s kept predictions")
        return predictions

    def _rebuild_models(self, trial: optuna.trial.FrozenTrial, path: Path) -> None:
        """Trained again (``retrained`` holds the fit); the file written anew for the next export."""
        result = self.result(trial)
        if path.parent.is_dir():
            files.write_bytes(
                path, fold_models(self.config_of(trial), result, self.datamodule), f"trial {trial.number}'s fold models"
            )
