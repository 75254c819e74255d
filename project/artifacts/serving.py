"""The best model as an MLflow Model: a pyfunc over the ``Predictor``, registered under the task's name.

``mlflow.pyfunc.load_model("models:/house-prices/latest").predict(test_frame)`` returns what
``submission.csv`` holds, and ``mlflow models serve -m models:/house-prices/latest --env-manager
local`` answers the same on ``/invocations``. What the model holds: this package's code (MLflow's
``code_paths``), ``project/artifacts/mlflow_model.py`` as its entry point (MLflow's models-from-code: the
file is run when the model is loaded, so no ``python_model.pkl`` is written or unpickled), and the
predictor's folder of plain files (see ``project/artifacts/predictor.py``). Its requirements are pinned to
the versions that trained it.
"""

from __future__ import annotations

import tempfile
import warnings
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature, infer_signature
from mlflow.pyfunc import PythonModel
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from project.artifacts.predictor import Predicts, load_predictor
from project.config.imports import own_code

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # all of project/, shipped with the model
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
REQUIREMENTS = (
    "torch",
    "lightning",
    "torchmetrics",
    "numpy",
    "pandas",
    "scikit-learn",
    "skops",
    "omegaconf",
    "optuna",
    "mlflow",
)


class PredictorModel(PythonModel):
    """``predict`` takes raw rows (a DataFrame with the test file's columns) or images
    (``[N, C, H, W]`` uint8) and returns the submission's rows for them."""

    # predict has no type hints on purpose (below); this is MLflow's switch for such a class, without
    # which it warns, as the class is defined, on every import of this module
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        self.predictor = load_predictor(Path(context.artifacts["predictor"]))

    # no type hints: MLflow would read them as a schema (a table), and this model also takes images
    def predict(self, context, model_input, params=None):
        return self.predictor.predict(model_input)


def pinned_requirements() -> list[str]:
    return [f"{name}=={metadata.version(name)}" for name in REQUIREMENTS]


def signature(predictor: Predicts, test_inputs: pd.DataFrame | np.ndarray) -> ModelSignature:
    """The model's signature, inferred from the whole test split as it was read (a column empty in
    the first rows still gets its type), every table column optional: a request may leave any value
    empty, as the test file does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        inferred = infer_signature(test_inputs, predictor.predict(test_inputs))
    if not isinstance(test_inputs, pd.DataFrame):
        return inferred
    columns: list[ColSpec | TensorSpec] = [ColSpec(c.type, c.name, required=False) for c in inferred.inputs.inputs]
    return ModelSignature(Schema(columns), inferred.outputs)


def log_predictor(
    predictor: Predicts,
    tracking_uri: str,
    run_id: str,
    test_inputs: pd.DataFrame | np.ndarray,
    registered_name: str | None = None,
    tags: dict | None = None,
    saved: Path | None = None,
) -> ModelVersion | None:
    """Log the predictor as the run's MLflow Model (a logged model, with a signature and five test
    rows as its input example); register it under ``registered_name`` with ``tags``, where given.
    ``saved``: the folder ``predictor.save`` already wrote, logged as it is rather than saved again."""
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # the predict method has no type hints on purpose (see PredictorModel)
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
        folder = saved or predictor.save(Path(tmp) / "predictor")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"predictor": str(folder)},
            code_paths=[str(PACKAGE_DIR), *map(str, own_code(predictor.task.preset))],
            signature=signature(predictor, test_inputs),
            input_example=test_inputs[:5],
            pip_requirements=pinned_requirements(),
            registered_model_name=registered_name,
        )
    if registered_name is None:
        return None
    client = mlflow.MlflowClient(tracking_uri)
    version = client.get_model_version(registered_name, str(info.registered_model_version))
    for key, value in (tags or {}).items():
        client.set_model_version_tag(registered_name, version.version, key, str(value))
    return version
