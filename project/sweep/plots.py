"""Study plots as PNG files: optimisation history, parameter importances, slices, learning curves."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import optuna
from optuna.visualization import matplotlib as optuna_plots

from project.cv import CVResult
from project.utils import files


def _save(axes, path: Path) -> Path:
    figure = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
    figure.set_size_inches(9, 5.5)
    figure.tight_layout()
    return _write(figure, path)


def _write(figure, path: Path) -> Path:
    with files.atomic_path(path, f"the plot {path.name}") as tmp:
        figure.savefig(tmp, dpi=100, format=path.suffix.lstrip("."))
    plt.close(figure)
    return path


def study_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Every plot the study has enough trials for; one that cannot be drawn is skipped."""
    plots: dict[str, Callable[[optuna.Study], Any]] = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "param_importances.png": optuna_plots.plot_param_importances,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
        "slice.png": optuna_plots.plot_slice,
    }
    written = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
        for name, plot in plots.items():
            try:
                written.append(_save(plot(study), out_dir / name))
            except (ValueError, RuntimeError, ZeroDivisionError) as err:
                print(f"plot {name} skipped: {err}")
                plt.close("all")
    return written


def learning_curves(result: CVResult, folds: list, path: Path) -> Path:
    """Training loss and validation metric per epoch, one line per fold."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    key = f"val_{result.metric}"
    for fold, history in zip(folds, result.history):
        epochs = [r["epoch"] for r in history]
        left.plot(epochs, [r["train_loss"] for r in history], label=f"fold {fold}")
        right.plot(epochs, [r.get(key, float("nan")) for r in history], label=f"fold {fold}")
    left.set(title="training loss", xlabel="epoch", yscale="log")
    right.set(title=f"validation {result.metric}", xlabel="epoch")
    if result.metric == "rmse":
        right.set_ylim(bottom=0, top=min(0.4, max(r.get(key, 0) for h in result.history for r in h)))
    right.legend()
    figure.tight_layout()
    return _write(figure, path)
