"""What a command prints is its own: the libraries' INFO lines (MLflow creating its tables or
checking an input example, Optuna creating or loading a study) show only with ``--verbose``;
their warnings and errors always do."""

from __future__ import annotations

import logging

LIBRARIES = ("mlflow", "optuna", "alembic")


def quiet_libraries(verbose: bool = False) -> None:
    """The libraries' loggers at WARNING (INFO with ``verbose``), in this process."""
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
