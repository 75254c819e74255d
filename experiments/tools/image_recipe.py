"""One configuration of an image task on one validation fold: the measurements behind the image
recipe in docs/results.md.

    python experiments/tools/image_recipe.py                           # the Fashion-MNIST CNN as its preset has it
    python experiments/tools/image_recipe.py --set models.cnn.train.precision=32-true
    python experiments/tools/image_recipe.py --set models.cnn.args.convs=1 --json recipe.jsonl

Trains the preset's configuration of ``--model`` (its ``args`` and ``train``, which a sweep's
first trial starts from; ``--lr``, ``--max-epochs`` and the like change it as in train.py) on the
training part of validation fold ``--fold``, as a trial of a sweep with ``validation_folds: 1``
does, and prints the fold's validation accuracy, the same with each prediction's class
probabilities averaged with its mirror image's (``tta_flip`` averages the logits instead), the
seconds the fit took and the accuracy after each epoch. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from project.cli import add_common_arguments, config_overrides, load_task
from project.cv import cross_validate
from project.data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.set_defaults(task="fashion-mnist")
    parser.add_argument("--fold", type=int, default=0, help="the validation fold (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    task, model = load_task(args, parser)
    if task.preset.data.kind == "csv":
        parser.error(f"argument --task: {task.name!r} holds table rows; expected an image task")
    if not 0 <= args.fold < task.folds:
        parser.error(f"argument --fold: {args.fold} is not a fold of {task.folds}; expected 0 to {task.folds - 1}")
    config = task.config(model, **config_overrides(args))
    try:
        datamodule = task.prepared(args.data_dir, fold=[args.fold], seed=args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    result = cross_validate(task, config, datamodule=datamodule, seed=args.seed)
    seconds = time.perf_counter() - start
    module = result.fits[0].module.eval()
    # each validation image's prediction averaged with its mirror image's, under the fit's autocast
    bf16 = config.precision == "bf16-mixed"
    mirrored_correct = rows = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in datamodule.val_loader(device=torch.device("cpu")):
            kept = batch["w"] > 0
            plain = module(batch["x"]).float().softmax(-1)
            mirrored = plain + module(batch["x"].flip(-1)).float().softmax(-1)
            mirrored_correct += ((mirrored.argmax(-1) == batch["y"]) & kept).sum().item()
            rows += kept.sum().item()
    metric = f"val_{module.metric_name}"
    figures = {
        "task": task.name,
        "model": model,
        "overrides": args.overrides,
        "fold": args.fold,
        metric: round(result.fold_scores[0], 5),
        "val_acc_mirror_averaged": round(mirrored_correct / rows, 5),
        "seconds": round(seconds),
        "curve": [round(record[metric][0], 4) for record in module.history],
    }
    print(json.dumps(figures))
    if args.json is not None:
        with args.json.open("a") as out:
            out.write(json.dumps(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
