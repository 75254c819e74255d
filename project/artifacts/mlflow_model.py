"""The entry point of the MLflow Model (MLflow's models-from-code): run when the model is loaded."""

from mlflow.models import set_model

from project.artifacts.serving import PredictorModel

set_model(PredictorModel())
