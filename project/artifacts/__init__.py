"""What a run delivers: the saved predictor (``predictor``, its weights in ``model_io``), the refit
on every training row (``refit``), the submission file (``submission``) and the MLflow Model that
serves the predictor (``serving``, loaded through ``mlflow_model``)."""
