"""Cross-validate one configuration and log it to MLflow.

    python experiments/train.py --task house-prices --folds 5 --max-epochs 30 --hidden-sizes none
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from project.cli import add_common_arguments, fixed_params, output_dir
from project.cv import TrainingDiverged, cross_validate
from project.data import DataError
from project.final import house_prices_submission, refit_and_test, save_model, test_metrics
from project.tasks import TrainConfig, get_task
from project.tuning.tracking import Tracker, environment_tags


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--sequential-folds", action="store_true",
                        help="fit the folds one after another instead of as one fold-stacked model")
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    task = get_task(args.task)
    out = output_dir(args, parser)
    config = TrainConfig(**{**task.defaults, **fixed_params(args)})
    if args.threads:
        torch.set_num_threads(args.threads)

    tracker = Tracker(args.tracking_uri, args.experiment_name or task.name)
    run_id = tracker.start_run(f"train-{task.name}", tags={**environment_tags(), "kind": "train"})
    status = "FAILED"
    try:
        tracker.log_params(run_id, {**config.to_dict(), "task": task.name, "folds": args.folds, "seed": args.seed,
                                    "fold_batching": not args.sequential_folds})
        datamodule = task.datamodule(data_dir=args.data_dir, n_folds=args.folds, fold=list(range(args.folds)),
                                     seed=args.seed, **task.datamodule_kwargs)
        datamodule.prepare_data()
        datamodule.setup()
        result = cross_validate(task, config, seed=args.seed, batched=not args.sequential_folds, datamodule=datamodule)
        tracker.log_cv(run_id, result, datamodule.folds)
        tracker.log_metrics(run_id, {"cv_seconds": result.seconds})
        print(f"{task.name}: CV {task.metric} {result.mean:.5f} ± {result.std:.5f} over {args.folds} folds "
              f"({', '.join(f'{s:.4f}' for s in result.fold_scores)}) in {result.seconds:.1f}s")

        summary = {"task": task.name, "metric": task.metric, "cv_mean": result.mean, "cv_std": result.std,
                   "fold_scores": result.fold_scores, "params": config.to_dict(), "seconds": result.seconds}
        with tempfile.TemporaryDirectory() as tmp:
            if task.kind == "regression":
                submission = house_prices_submission(result, datamodule, out / "submission.csv")
                tracker.log_artifact(run_id, submission)
                summary["submission"] = str(submission)
                model = save_model(result.modules[0], config, datamodule.n_features, Path(tmp) / "model.pt")
            else:
                module, scores = refit_and_test(task, config, args.data_dir, args.seed, out / "predictions.csv")
                tracker.log_metrics(run_id, test_metrics(scores))
                tracker.log_artifact(run_id, out / "predictions.csv")
                summary.update(scores)
                print(f"{task.name}: refit on all training images ({task.ensemble} seeds averaged), "
                      f"test accuracy {scores['test_accuracy']:.4f}")
                model = save_model(module, config, datamodule.n_features, Path(tmp) / "model.pt")
            tracker.log_artifact(run_id, model, "model")
        summary["mlflow"] = {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                             "run_id": run_id}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        tracker.log_artifact(run_id, out / "summary.json")
        status = "FINISHED"
        print(f"wrote {out / 'summary.json'}; MLflow run {run_id}\n  {tracker.ui_command()}")
        return 0
    except TrainingDiverged as err:
        tracker.set_tags(run_id, {"failure": str(err)})
        print(f"error: {err}; try a smaller --lr", file=sys.stderr)
        return 1
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        tracker.end_run(run_id, status)


if __name__ == "__main__":
    sys.exit(main())
