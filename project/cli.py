"""Command-line flags shared by the entry points in experiments/, with checks that name the flag.

Building a parser imports nothing heavy, so ``--help`` answers at once: torch, Lightning, Optuna
and MLflow are imported by the functions that use the parsed flags.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from project.config import PresetError, available, preset_path
from project.config.schema import ENSEMBLES
from project.utils.paths import REPO_ROOT

if TYPE_CHECKING:
    from project.sweep.study import SweepSettings
    from project.tasks import Task


def _number(kind: type, check, expected: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected {expected}") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"{text} is invalid; expected {expected}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer of at least 1")
folds_int = _number(int, lambda v: v >= 2, "an integer of at least 2 (K-fold needs two folds)")
positive_float = _number(float, lambda v: v > 0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0, "a number of at least 0")
dropout_float = _number(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def hidden_sizes(text: str) -> tuple[int, ...]:
    """``256,128`` for two hidden layers; ``none`` (or an empty string) for the linear model."""
    if text.strip().lower() in ("", "none", "linear"):
        return ()
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated widths like 256,128 or 'none'") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: layer widths must be at least 1")
    return sizes


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags train.py and sweep.py share."""
    parser.add_argument(
        "--task",
        default="house-prices",
        help=f"a preset in experiments/configs/ ({', '.join(available())}; default: %(default)s)",
    )
    parser.add_argument("--config", type=Path, default=None, help="a preset file of your own (instead of --task)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one preset value, e.g. --set data.target_transform=log1p (repeatable)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the model, by its registered name (or module:Class), one the preset has settings for "
        "(default: the preset's)",
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module of your own to import first, e.g. one that registers a model (repeatable; added to the "
        "preset's imports)",
    )
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="raw data folder (default: data/)")
    parser.add_argument("--folds", type=folds_int, default=None, help="number of CV folds (default: the preset's)")
    parser.add_argument(
        "--max-epochs",
        type=positive_int,
        default=None,
        help="epochs per fit (default: the task's default, or searched by the sweep)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="mini-batch size (default: the task's default, or searched by the sweep)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the folds, initialisation and batches (default: 0)"
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the repo)",
    )
    parser.add_argument("--experiment-name", default=None, help="MLflow experiment (default: the task name)")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=None,
        help="where summary.json and the submission go (default: experiments/outputs/<task>/)",
    )
    parser.add_argument("--lr", type=positive_float, default=None, help="learning rate (sweep: fixes it)")
    parser.add_argument(
        "--weight-decay", type=non_negative_float, default=None, help="weight decay, AdamW's or SGD's (sweep: fixes it)"
    )
    parser.add_argument(
        "--dropout", type=dropout_float, default=None, help="the model's dropout rate (sweep: fixes it)"
    )
    parser.add_argument(
        "--hidden-sizes",
        type=hidden_sizes,
        default=None,
        help="the MLP's hidden widths, e.g. 256,128, or 'none' for the linear model (sweep: fixes width and depth)",
    )
    parser.add_argument(
        "--sequential-folds",
        action="store_true",
        help="fit the folds one after another instead of as one fold-stacked model",
    )
    parser.add_argument(
        "--deterministic",
        choices=("true", "warn", "false"),
        default=None,
        help="torch's deterministic algorithms: true (the same seed gives the same scores), warn "
        "(a warning where an op has none, as some CUDA backward passes), false "
        "(default: the preset's deterministic, true)",
    )
    parser.add_argument(
        "--benchmark",
        action="store_true",
        help="let timing choose arithmetic that changes the last digits of the scores (how a model's folds "
        "train, cuDNN's kernels), recorded on the runs (default: the preset's benchmark, false)",
    )
    parser.add_argument("--verbose", action="store_true", help="also the libraries' INFO lines (MLflow's, Optuna's)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch CPU threads (default: all cores, divided among --n-jobs workers)",
    )


def load_task(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Task, str]:
    """The task of ``--task`` or ``--config`` with ``--set`` and ``--folds`` applied, and the model
    of ``--model``; a bad preset, or one whose data files or columns are not there, exits 2."""
    from project.models import MODELS
    from project.models.registry import model_class
    from project.tasks import Task
    from project.validate import check_data, load_preset

    try:
        path = args.config or preset_path(args.task)
        values = {"folds": args.folds} if args.folds is not None else {}
        if args.deterministic is not None:
            values["deterministic"] = {"true": True, "false": False}.get(args.deterministic, args.deterministic)
        if args.benchmark:
            values["benchmark"] = True
        task = Task(load_preset(path, args.overrides, values, args.imports))
        check_data(task.preset, args.data_dir)
    except PresetError as err:
        parser.error(f"argument {'--config' if args.config else '--task'}: {err}")
    model = args.model or task.default_model
    try:
        model_class(model)
    except ValueError:
        parser.error(
            f"argument --model: {model!r} is not a registered model; registered: {', '.join(sorted(MODELS))} "
            "(a model of your own: name its module with --import or the preset's imports, or give module:Class)"
        )
    if model not in task.preset.models:
        parser.error(
            f"argument --model: preset {task.name!r} ({task.preset.source}) has no settings for model "
            f"{model!r}; it has {', '.join(task.preset.models)} (add them under 'models')"
        )
    check_model_flags(args, model, parser)
    return task, model


def run_name(task: Task, model: str) -> str:
    """The task's name, with the model's where it is not the preset's default: names the study and
    the output directory, so two models' sweeps of one task do not overwrite each other."""
    return task.name if model == task.default_model else f"{task.name}-{model}"


def output_dir(args: argparse.Namespace, parser: argparse.ArgumentParser, name: str) -> Path:
    """The output directory, created and checked for write access before any work starts."""
    path = args.output_dir or REPO_ROOT / "experiments" / "outputs" / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"argument --output-dir: cannot create {path}: {err.strerror}")
    try:  # a real file, where os.access would pass a read-only folder for root
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        parser.error(f"argument --output-dir: {path} is not writable: {err.strerror}")
    return path


CONFIG_FLAGS = ("lr", "weight_decay", "dropout", "hidden_sizes", "max_epochs", "batch_size")
MODEL_FLAGS = ("dropout", "hidden_sizes")  # arguments of the model itself


def fixed_params(args: argparse.Namespace) -> dict:
    """The configuration values given on the command line, by search key (``lr``, ``model.dropout``):
    a sweep uses them as they are instead of searching them."""
    return {
        (f"model.{name}" if name in MODEL_FLAGS else name): getattr(args, name)
        for name in CONFIG_FLAGS
        if getattr(args, name) is not None
    }


def config_overrides(args: argparse.Namespace) -> dict:
    """The command line's values as TrainConfig fields, the model's own under ``model_kwargs``."""
    given = fixed_params(args)
    overrides = {k: v for k, v in given.items() if not k.startswith("model.")}
    overrides["model_kwargs"] = {k.removeprefix("model."): v for k, v in given.items() if k.startswith("model.")}
    return overrides


def check_model_flags(args: argparse.Namespace, model: str, parser: argparse.ArgumentParser) -> None:
    """Refuse a model flag the chosen model has no argument for (``--hidden-sizes`` with the CNN)."""
    from project.models.registry import model_arguments

    accepted = model_arguments(model)
    for name in MODEL_FLAGS:
        if getattr(args, name) is not None and name not in accepted:
            parser.error(
                f"argument --{name.replace('_', '-')}: model {model!r} has no argument {name!r}; "
                f"it takes {', '.join(accepted) or 'none'}"
            )


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of sweep.py beside the common ones."""
    parser.add_argument(
        "--n-trials",
        type=positive_int,
        default=None,
        help="trials this invocation runs (default: the preset's sweep.trials)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=None, help="stop starting trials after this many seconds"
    )
    parser.add_argument(
        "--storage",
        default=None,
        help="Optuna storage URL (default: sqlite:///<output-dir>/optuna.db; postgresql://... for many machines)",
    )
    parser.add_argument("--study-name", default=None, help="study to create or resume (default: the task name)")
    parser.add_argument(
        "--n-jobs",
        type=positive_int,
        default=None,
        help="worker processes sharing the study (default: the preset's sweep.jobs, else two per GPU, "
        "each pinned to one GPU, else one per CPU core)",
    )
    parser.add_argument(
        "--validation-folds",
        type=positive_int,
        default=None,
        help="how many of the folds each trial trains and scores "
        "(default: the preset's sweep.validation_folds, else all)",
    )
    parser.add_argument("--no-pruning", action="store_true", help="run every trial to its last epoch")
    add_ensemble_argument(parser)


def add_ensemble_argument(parser: argparse.ArgumentParser) -> None:
    """``--ensemble``, of sweep.py and export_submission.py: what the study's submission is made of."""
    parser.add_argument(
        "--ensemble",
        choices=ENSEMBLES,
        default="greedy",
        help="the submission: an ensemble of the study's trials and the preset's sweep.estimators, "
        "selected on their out-of-fold predictions (greedy), of the trials alone (trials), or "
        "the best trial alone (none) (default: %(default)s)",
    )


def sweep_settings(
    args: argparse.Namespace, parser: argparse.ArgumentParser, entry_point: str
) -> tuple[SweepSettings, int, int]:
    """The sweep's settings from its flags and preset, with the trials and workers this command runs;
    a flag that cannot be used exits 2, naming it, before any work."""
    from project.sweep.study import STORAGE_SCHEMES, SweepSettings, default_storage
    from project.tracking.tracker import resolve_tracking_uri
    from project.utils.devices import default_workers, visible_gpus

    task, model = load_task(args, parser)
    name = run_name(task, model)
    out = output_dir(args, parser, name)
    storage = args.storage or default_storage(out)
    if not storage.startswith(STORAGE_SCHEMES):
        parser.error(
            f"argument --storage: unknown scheme in {storage!r}; expected sqlite:///PATH, "
            "postgresql://..., mysql://... or journal:PATH"
        )
    sweep = task.preset.sweep
    n_trials = args.n_trials or sweep.trials
    n_jobs = min(args.n_jobs or sweep.jobs or default_workers(os.cpu_count() or 1, len(visible_gpus())), n_trials)
    settings = SweepSettings(
        preset=task.preset.resolved(),
        data_dir=str(args.data_dir),
        seed=args.seed,
        storage=storage,
        study_name=args.study_name or name,
        tracking_uri="",
        experiment_name=args.experiment_name or task.name,
        model=model,
        fixed=fixed_params(args),
        stacking="sequential" if args.sequential_folds else "auto",
        pruning=sweep.pruning and not args.no_pruning,
        validation_folds=args.validation_folds or sweep.validation_folds or task.folds,
        threads=args.threads or max(1, (os.cpu_count() or 1) // n_jobs),
        entry_point=entry_point,
        output_dir=str(out),
        command=uuid.uuid4().hex,
        ensemble=args.ensemble,
        verbose=args.verbose,
    )
    if settings.validation_folds > settings.folds:
        parser.error(
            f"argument --validation-folds: {settings.validation_folds} is more than the {settings.folds} folds"
        )

    settings.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    return settings, n_trials, n_jobs
