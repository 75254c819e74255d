"""A trained task as one object that predicts from raw inputs what its submission holds.

A ``Predictor`` holds the members (the K fold models, or a refit's seeds) as plain modules in one
stack, their head, what turned raw inputs into their features (each member's fitted table
preprocessing, or its pixel normalisation) and the task's preset. It writes the submission, and
the MLflow Model wraps it (``project/artifacts/serving.py``), so both give the same predictions.

Saved as a folder of plain files, none of them a pickle: ``task.yaml`` (the resolved preset),
``model.pt`` (``project.artifacts.model_io``: weights, loaded with ``weights_only=True``), ``inputs.json``
(class labels, pixel statistics) and ``preprocessing/member<m>.skops`` (each member's fitted
scikit-learn transformer, loaded by skops with only the scikit-learn and project types listed in
``TRUSTED`` allowed). An ``EstimatorPredictor`` is the same for a preset's scikit-learn estimator
fitted on each fold, and an ``Ensemble`` the weighted average of several of either.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import cast
from zipfile import ZIP_DEFLATED

import numpy as np
import pandas as pd
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from project.artifacts.model_io import load_model, save_model
from project.artifacts.submission import SubmissionFormat, prediction_frame, write_submission
from project.config import TrainConfig, from_resolved, to_yaml
from project.config.imports import add_to_path, own_code
from project.cv import Fit
from project.data import FoldDataModule, TableDataModule, data_kind
from project.data.base import Members
from project.data.batches import MemberFeatures, StackedBatches
from project.data.tabular import FoldPreprocessor
from project.engine import inference_stack
from project.engine.heads import Head, head_outputs
from project.ensemble import estimators
from project.models import create_model
from project.tasks import Task
from project.utils import files

# what a saved member's preprocessing may be made of (anything else is refused when it is loaded)
TRUSTED = [
    "numpy.dtype",
    "numpy.ndarray",
    "numpy.float32",
    "numpy.float64",
    "numpy.int64",
    "builtins.object",
    "builtins.str",
    "builtins.float",
    "builtins.int",
    "sklearn.compose._column_transformer.ColumnTransformer",
    "sklearn.compose._column_transformer._RemainderColsList",
    "sklearn.pipeline.Pipeline",
    "sklearn.impute._base.SimpleImputer",
    "sklearn.impute._base.MissingIndicator",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.RobustScaler",
    "sklearn.preprocessing._data.QuantileTransformer",
    "sklearn.preprocessing._encoders.OneHotEncoder",
    "sklearn.preprocessing._function_transformer.FunctionTransformer",
    "project.data.tabular.QuantileClipper",
    "project.data.tabular.SkewedLog1p",
    "project.data.tabular.categories_as_text",
]
EVAL_ROWS = 4096


class Predicts:
    """What every predictor offers on top of ``averaged``: the submission's rows, and the file."""

    task: Task
    inputs: dict
    device = torch.device("cpu")

    def averaged(self, raw: pd.DataFrame | np.ndarray) -> Tensor:
        raise NotImplementedError

    def to(self, device: torch.device) -> Predicts:
        """Predict on ``device`` from now on (a GPU's, where the members trained); outputs come
        back on the CPU."""
        self.device = torch.device(device)
        return self

    def predict(self, raw: pd.DataFrame | np.ndarray, ids: np.ndarray | None = None) -> pd.DataFrame:
        """What the submission holds for these rows: their ids (``ids``, else a table's id column
        or the images' positions) with the prediction in the task's format."""
        return prediction_frame(self.task, self._format(raw, ids), self.inputs["classes"], self.averaged(raw))

    def write_submission(self, raw: pd.DataFrame | np.ndarray, path: Path, ids: np.ndarray | None = None) -> Path:
        """The submission for the test split's raw inputs, checked before it is written."""
        return write_submission(self.predict(raw, ids), self._format(raw, ids), path)

    def write(self, folder: Path) -> None:
        """The predictor's files, into the new, empty ``folder``."""
        raise NotImplementedError

    def save(self, folder: Path) -> Path:
        """The predictor as a folder of plain files, which replaces ``folder`` once it is whole."""
        with files.atomic_folder(folder, "the model") as tmp:
            self.write(tmp)
        return Path(folder)

    def _format(self, raw: pd.DataFrame | np.ndarray, ids: np.ndarray | None) -> SubmissionFormat:
        if ids is None:
            ids = raw[self.task.preset.data.id].to_numpy() if isinstance(raw, pd.DataFrame) else np.arange(len(raw))
        return SubmissionFormat.of(self.task, ids, self.inputs["classes"])


class Predictor(Predicts):
    def __init__(
        self,
        task: Task,
        config: TrainConfig,
        members: list[nn.Module],
        head: Head,
        preprocessors: list[FoldPreprocessor] | None,
        inputs: dict,
    ) -> None:
        self.task, self.config, self.head, self.preprocessors, self.inputs = (
            task,
            config,
            head.eval(),
            preprocessors,
            inputs,
        )
        self.stack = inference_stack(members, config.model).eval()

    @classmethod
    def from_fits(cls, task: Task, config: TrainConfig, fits: list[Fit], datamodule: FoldDataModule) -> Predictor:
        """The members of ``fits`` (one stack, or folds trained one after another)."""
        _, head_state = fits_state(fits)
        members = [m for f in fits for m in _plain_members(f, config, datamodule)]
        return cls.of_members(task, config, members, head_state, [f.members for f in fits], datamodule)

    @classmethod
    def of_members(
        cls,
        task: Task,
        config: TrainConfig,
        members: list[nn.Module],
        head_state: dict[str, Tensor],
        sets: list[Members],
        datamodule: FoldDataModule,
    ) -> Predictor:
        """Trained plain ``members`` with their head's state, the members of ``sets`` (whose
        preprocessing they were trained on) in that order."""
        head = task.head(config, [torch.zeros(1)] * len(members))
        head.load_state_dict(head_state)
        preprocessors = None if sets[0].preprocessors is None else [p for s in sets for p in s.preprocessors or []]
        inputs = {
            "sample_shape": list(datamodule.sample_shape),
            "out_features": datamodule.out_features,
            "folds": [fold for s in sets for fold in s.folds],
            "classes": class_labels(datamodule),
        }
        if sets[0].features.shared:  # images: each member's pixel statistics
            inputs["shift"] = torch.cat([cast(Tensor, s.features.shift) for s in sets]).tolist()
            inputs["scale"] = torch.cat([cast(Tensor, s.features.scale) for s in sets]).tolist()
        return cls(task, config, members, head, preprocessors, inputs)

    def member_outputs(self, raw: pd.DataFrame | np.ndarray) -> Tensor:
        """Each member's head outputs on raw inputs, ``[M, N, ...]``: table rows as the test file
        holds them, or images ``[N, C, H, W]`` of uint8 pixels."""
        features = self._features(raw)
        loader = StackedBatches(
            features,
            None,
            [torch.arange(features.n_rows)] * self.stack.members,
            EVAL_ROWS,
            nonzero=self.stack.accepts_nonzero,
            device=self.device,
        )
        with torch.no_grad():
            outputs = (head_outputs(self.stack, self.head, batch["x"], self.config.tta_flip) for batch in loader)
            return torch.cat([o.cpu() for o in outputs], dim=1)

    def to(self, device: torch.device) -> Predictor:
        super().to(device)
        self.stack.to(self.device)
        self.head.to(self.device)
        return self

    def averaged(self, raw: pd.DataFrame | np.ndarray) -> Tensor:
        """The members' average: regression outputs on the learnt scale, or class probabilities."""
        return self.head.predictions(self.member_outputs(raw)).mean(dim=0)

    def _features(self, raw: pd.DataFrame | np.ndarray) -> MemberFeatures:
        kind = data_kind(self.task.preset.data.kind)
        return kind.features_of(self.task.preset, raw, self.inputs, self.preprocessors)

    def write(self, folder: Path) -> None:
        import skops.io

        save_task(folder, self.task, self.inputs)
        save_model(
            folder / "model.pt",
            self.config,
            self.inputs["sample_shape"],
            self.inputs["out_features"],
            self.inputs["folds"],
            self.stack.member_state_dict(),
            self.head.state_dict(),
        )
        for m, pre in enumerate(self.preprocessors or []):
            (folder / "preprocessing").mkdir(exist_ok=True)
            skops.io.dump(pre.columns_, folder / "preprocessing" / f"member{m}.skops")

    @classmethod
    def load(cls, folder: Path) -> Predictor:
        folder = Path(folder)
        task, inputs = load_task(folder)
        with reading(folder / "model.pt"):
            members, config, saved = load_model(folder / "model.pt")
            head = task.head(config, [torch.zeros(1)] * len(members))
            head.load_state_dict(saved["head"])
        paths = sorted((folder / "preprocessing").glob("member*.skops"), key=lambda p: int(p.stem[6:]))
        preprocessors = [load_preprocessor(task, path) for path in paths] or None
        return cls(task, config, members, head, preprocessors, inputs)


class EstimatorPredictor(Predicts):
    """A preset's scikit-learn estimator fitted on each fold (``project/ensemble/estimators.py``): the fold
    models' average, each model seeing its fold's own preprocessing of the raw rows. Saved as
    ``estimator.json`` (its name, class and arguments), ``task.yaml``, ``inputs.json`` and one
    skops file per fold under ``preprocessing/`` and ``models/``; loading trusts the types of
    scikit-learn, NumPy, SciPy and of the package the estimator's class comes from, nothing else."""

    def __init__(
        self, task: Task, fitted: dict, models: list, preprocessors: list[FoldPreprocessor], inputs: dict
    ) -> None:
        self.task, self.fitted, self.models, self.preprocessors, self.inputs = (
            task,
            fitted,
            models,
            preprocessors,
            inputs,
        )

    @classmethod
    def from_fitted(cls, task: Task, fitted, datamodule: FoldDataModule) -> EstimatorPredictor:
        """The fold models of a ``FittedEstimator`` on ``datamodule``'s folds."""
        members = datamodule.members
        return cls(
            task,
            {"name": fitted.name, "estimator": fitted.reference, "args": fitted.args},
            fitted.models,
            list(members.preprocessors or []),
            {"folds": list(members.folds), "classes": class_labels(datamodule)},
        )

    def averaged(self, raw: pd.DataFrame) -> Tensor:
        frame = TableDataModule.rows_of(self.task.preset, raw)
        classes = len(self.inputs["classes"] or [None])
        outputs = [
            estimators.predict(self.task, model, preprocessor.transform(frame), classes)
            for model, preprocessor in zip(self.models, self.preprocessors)
        ]
        return torch.from_numpy(np.mean(outputs, axis=0))

    def write(self, folder: Path) -> None:
        import skops.io

        save_task(folder, self.task, self.inputs)
        for part in ("preprocessing", "models"):
            (folder / part).mkdir(exist_ok=True)
        (folder / "estimator.json").write_text(json.dumps(self.fitted, indent=2))
        for m, (model, pre) in enumerate(zip(self.models, self.preprocessors)):
            # compressed: a boosted model's trees are many small arrays, a sixth of their size zipped
            skops.io.dump(pre.columns_, folder / "preprocessing" / f"member{m}.skops", compression=ZIP_DEFLATED)
            skops.io.dump(model, folder / "models" / f"member{m}.skops", compression=ZIP_DEFLATED)

    @classmethod
    def load(cls, folder: Path) -> EstimatorPredictor:
        import skops.io

        folder = Path(folder)
        task, inputs = load_task(folder)
        with reading(folder / "estimator.json"):
            fitted = json.loads((folder / "estimator.json").read_text())
        roots = {"sklearn", "numpy", "scipy", "builtins", fitted["estimator"].split(".")[0].split(":")[0]}
        models = []
        for m in range(len(inputs["folds"])):
            path = folder / "models" / f"member{m}.skops"
            with reading(path):
                trusted = [t for t in skops.io.get_untrusted_types(file=path) if t.split(".")[0] in roots]
                models.append(skops.io.load(path, trusted=trusted))
        preprocessors = [
            load_preprocessor(task, folder / "preprocessing" / f"member{m}.skops") for m in range(len(inputs["folds"]))
        ]
        return cls(task, fitted, models, preprocessors, inputs)


class Ensemble(Predicts):
    """Several predictors (trials selected from a study, estimators fitted beside them) as one: the
    weighted average of their averaged outputs (regression outputs on the learnt scale, or class
    probabilities). Saved as ``ensemble.json`` (the weights and the members they belong to: a
    trial's number or an estimator's name) and one predictor folder per member."""

    def __init__(
        self, weights: list[float], predictors: Sequence[Predicts], members: Sequence[int | str | None]
    ) -> None:
        self.weights, self.predictors, self.members = weights, predictors, members
        self.task, self.inputs = predictors[0].task, predictors[0].inputs

    def averaged(self, raw: pd.DataFrame | np.ndarray) -> Tensor:
        return cast(Tensor, sum(w * p.averaged(raw) for w, p in zip(self.weights, self.predictors)))

    def to(self, device: torch.device) -> Ensemble:
        super().to(device)
        for predictor in self.predictors:
            predictor.to(device)
        return self

    def write(self, folder: Path) -> None:
        (folder / "ensemble.json").write_text(json.dumps({"weights": self.weights, "members": self.members}, indent=2))
        for i, predictor in enumerate(self.predictors):
            (folder / f"member{i}").mkdir()
            predictor.write(folder / f"member{i}")

    @classmethod
    def load(cls, folder: Path) -> Ensemble:
        with reading(Path(folder) / "ensemble.json"):
            spec = json.loads((Path(folder) / "ensemble.json").read_text())
        predictors = [load_predictor(Path(folder) / f"member{i}") for i in range(len(spec["weights"]))]
        return cls(spec["weights"], predictors, spec["members"])


def load_predictor(folder: Path) -> Predicts:
    """A saved ``Predictor``, ``EstimatorPredictor`` or ``Ensemble``."""
    folder = Path(folder)
    if (folder / "ensemble.json").is_file():
        return Ensemble.load(folder)
    return EstimatorPredictor.load(folder) if (folder / "estimator.json").is_file() else Predictor.load(folder)


def class_labels(datamodule: FoldDataModule) -> list | None:
    """A classification task's labels as plain values (what inputs.json keeps), else None."""
    classes = getattr(datamodule, "classes", None)
    return None if classes is None else [c.item() if isinstance(c, np.generic) else c for c in classes]


def save_task(folder: Path, task: Task, inputs: dict) -> None:
    """What every saved predictor holds: the resolved preset, what its inputs look like, and the
    user's own modules it needs (``code/``), so that it loads in a process started elsewhere."""
    (folder / "task.yaml").write_text(to_yaml(task.preset.resolved()))
    (folder / "inputs.json").write_text(json.dumps(inputs, indent=2))
    for path in own_code(task.preset):
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        (folder / "code").mkdir(exist_ok=True)
        copy(path, folder / "code" / path.name)


def load_task(folder: Path) -> tuple[Task, dict]:
    """The task and inputs ``save_task`` wrote, its own code importable first."""
    add_to_path(folder / "code")
    with reading(folder / "task.yaml"):
        task = Task(from_resolved(cast(dict, OmegaConf.to_container(OmegaConf.load(folder / "task.yaml")))))
    with reading(folder / "inputs.json"):
        return task, json.loads((folder / "inputs.json").read_text())


def load_preprocessor(task: Task, path: Path) -> FoldPreprocessor:
    """A member's saved table preprocessing, loaded with only the ``TRUSTED`` types allowed."""
    import skops.io

    with reading(path):
        columns = skops.io.load(path, trusted=TRUSTED)
    return FoldPreprocessor(TableDataModule.spec_of(task.preset), task.preset.data.preprocess).restored(columns)


class ModelUnreadable(Exception):
    """A saved model's file that cannot be read (missing, truncated, altered): names it, and how
    to write the model again."""

    def __init__(self, path: Path, err: Exception) -> None:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        super().__init__(
            f"cannot read the saved model's file {path} ({reason}): write the model again with "
            "`python experiments/export_submission.py` (a sweep's) or `python experiments/train.py`, "
            "with the same --output-dir"
        )
        self.path = path


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Any error reading ``path`` becomes a ``ModelUnreadable`` that names it."""
    try:
        yield
    except ModelUnreadable:
        raise
    except Exception as err:  # noqa: BLE001 - torch, skops and pickle raise many types on a damaged file
        raise ModelUnreadable(path, err) from None


def fits_state(fits: list[Fit]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The members' stacked weights and their head's state, of one fit or several in turn."""
    nets = [f.module.net.member_state_dict() for f in fits]
    heads = [f.module.head.state_dict() for f in fits]
    return (
        {k: torch.cat([n[k] for n in nets]) for k in nets[0]},
        {k: torch.cat([h[k] for h in heads]) for k in heads[0]},
    )


def _plain_members(fit: Fit, config: TrainConfig, datamodule: FoldDataModule) -> list[nn.Module]:
    """A fit's members as plain modules, each holding its own weights."""
    state = fit.module.net.member_state_dict()
    members = []
    for m in range(len(fit.members)):
        module = create_model(config.model, datamodule.sample_shape, datamodule.out_features, **config.model_kwargs)
        module.load_state_dict({k: v[m] for k, v in state.items()})
        members.append(module.eval())
    return members
