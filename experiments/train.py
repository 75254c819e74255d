"""Cross-validate one configuration and log it to MLflow.

python experiments/train.py --task house-prices --folds 5 --max-epochs 30 --hidden-sizes none
"""

from __future__ import annotations

import argparse
import sys

from project.cli import add_common_arguments, config_overrides, load_task, output_dir, run_name
from project.utils.output import quiet_libraries


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    from project.utils.stopping import handling_signals  # after the flags: --help answers at once

    with handling_signals():  # Ctrl-C or SIGTERM: a clean stop, see project/utils/stopping.py
        return train(args, parser)


def train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from project.artifacts.predictor import Predictor
    from project.artifacts.refit import Refit, refit_and_test, refit_metrics
    from project.config import to_yaml
    from project.cv import cross_validate, init_model
    from project.data import DataError
    from project.deliverables import EndingRun, deliver
    from project.tracking.logger import run_loggers
    from project.tracking.tracker import Tracker, dataset_inputs, environment_tags
    from project.utils.devices import describe, training_device

    quiet_libraries(args.verbose)  # once they are imported: MLflow sets its loggers then
    task, model = load_task(args, parser)
    out = output_dir(args, parser, run_name(task, model))
    try:
        config = task.config(model, **config_overrides(args))
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        datamodule = task.prepared(args.data_dir, fold=list(range(task.folds)), seed=args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:  # a model that cannot take this task's samples (a CNN on table rows) is refused before any work
        init_model(config, datamodule.sample_shape, datamodule.out_features, args.seed)
    except ValueError as err:
        parser.error(f"argument --model: {err}")

    tracker = Tracker(args.tracking_uri, args.experiment_name or task.name, pending=out / "mlflow-pending")
    tracker.send_kept()  # what an earlier command could not log
    run_id = tracker.start_run(f"train-{task.name}", tags={**environment_tags(__file__), "kind": "train"})
    with EndingRun(tracker, run_id, left_for="the next train.py with this --output-dir") as run:
        tracker.log_params(run_id, {**config.flat(), "task": task.name, "folds": task.folds, "seed": args.seed})
        tracker.log_text(run_id, to_yaml(task.preset.resolved()), "preset.yaml")
        tracker.log_inputs(run_id, dataset_inputs(datamodule))
        stacking = "sequential" if args.sequential_folds else "auto"
        loggers = run_loggers(tracker, run_id, f"train-{task.name}", out / "lightning")
        result = cross_validate(task, config, seed=args.seed, stacking=stacking, datamodule=datamodule, loggers=loggers)
        tracker.log_cv(run_id, result, datamodule.folds)
        tracker.log_metrics(run_id, {"cv_seconds": result.seconds})
        tracker.set_tags(
            run_id,
            {
                "fold_layout": result.layout,
                "benchmark": str(task.preset.benchmark).lower(),
                "device": describe(training_device()),
            },
        )
        scores = ", ".join(f"{s:.4f}" for s in result.fold_scores)
        print(
            f"{task.name}: CV {task.metric} {result.mean:.5f} ± {result.std:.5f} over {task.folds} folds "
            f"({scores}) in {result.seconds:.1f}s; folds {result.layout}"
        )
        summary = {"task": task.name, "metric": task.metric, "cv_mean": result.mean, "cv_std": result.std}
        summary |= {"fold_scores": result.fold_scores, "params": config.to_dict(), "seconds": result.seconds}
        summary["fold_layout"] = result.layout
        if task.refits:
            refit = Refit(config, seeds=task.seeds)
            submission = out / task.preset.submission.file
            predictor, test = refit_and_test(task, [refit], args.data_dir, args.seed, submission)
            tracker.log_metrics(run_id, refit_metrics(test))
            summary.update(test)
            figures = "".join(f", {k.replace('_', ' ')} {v:.4f}" for k, v in test.items() if not isinstance(v, list))
            print(f"{task.name}: refit on all training rows ({task.seeds} seeds averaged){figures}")
        else:
            predictor = Predictor.from_fits(task, config, result.fits, datamodule)
        deliver(predictor, datamodule, out, summary, tracker, run_id, submission_written=task.refits)
        print(f"wrote {out / 'summary.json'}; MLflow run {run_id}\n  {tracker.ui_command()}")
    return run.code


if __name__ == "__main__":
    sys.exit(main())
