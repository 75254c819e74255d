"""Would the pruner have cut trials that end among the best? Every trial of a finished study is
trained again to its last epoch, then the sweep's pruner and the epoch-indexed one it replaced
are replayed on those curves (trials in number order, as one worker takes them), and the trials
each would cut are compared with the median of all the trials' final scores.

    python experiments/tools/pruning_replay.py                                   # the default House Prices study
    python experiments/tools/pruning_replay.py --output-dir experiments/outputs/house-prices --study-name house-prices

Writes <output-dir>/pruning_replay.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from project.cli import output_dir
from project.cv import TrainingDiverged, cross_validate
from project.sweep.pruning import StepsFn, make_pruner, replay
from project.sweep.space import config_from_params
from project.sweep.study import PRESET_ATTR, SweepSettings, default_storage, make_storage
from project.utils import files
from project.utils.paths import REPO_ROOT

TOP = 5  # "among the best": the trials with the five best final scores


def epoch_indexed() -> tuple[optuna.pruners.BasePruner, StepsFn]:
    """The pruner the sweep had before: trials compared at the same epoch from the tenth on."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=6, n_warmup_steps=10)
    return pruner, lambda epoch, max_epochs, reported: range(epoch, epoch + 1)


def final_curves(study: optuna.Study, settings: SweepSettings) -> dict[int, list[float]]:
    """Each finished trial's mean validation score over its folds after every epoch, trained to its end."""
    task, datamodule = settings.task, settings.datamodule()
    curves = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        config = config_from_params(task, settings.model, trial.params, settings.fixed)
        try:
            result = cross_validate(task, config, seed=settings.seed, stacking=settings.stacking, datamodule=datamodule)
        except TrainingDiverged:
            continue
        key = f"val_{task.metric}"
        curves[trial.number] = [
            float(np.mean([fold[e][key] for fold in result.history])) for e in range(len(result.history[0]))
        ]
        final = curves[trial.number][-1]
        print(f"trial {trial.number:3d} {trial.state.name:8s} {config.max_epochs:4d} epochs: {final:.5f}", flush=True)
    return curves


def tally(
    verdicts: dict[int, int | None], finals: dict[int, float], median: float, best: set[int], sign: float
) -> dict:
    pruned = [n for n, epoch in verdicts.items() if epoch is not None]
    kept = [finals[n] for n in finals if n not in pruned]
    return {
        "pruned": len(pruned),
        "pruned_beating_median": sum(sign * finals[n] < sign * median for n in pruned),
        f"pruned_among_top{TOP}": sum(n in best for n in pruned),
        "best_kept": min(kept, key=lambda v: sign * v) if kept else None,
        "pruned_trials": {n: verdicts[n] for n in pruned},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-name", default="house-prices", help="(default: %(default)s)")
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: sqlite:///<output-dir>/optuna.db)"
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="(default: experiments/outputs/<study-name>/)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    args = parser.parse_args(argv)
    out = output_dir(args, parser, args.study_name)
    storage = args.storage or default_storage(out)
    try:
        study = optuna.load_study(study_name=args.study_name, storage=make_storage(storage))
    except (KeyError, ValueError) as err:
        parser.error(f"argument --study-name/--storage: no study {args.study_name!r} in {storage}: {err}")
    if PRESET_ATTR not in study.user_attrs:
        parser.error(f"argument --study-name: study {args.study_name!r} in {storage} stores no preset")
    settings = SweepSettings.of_study(study, storage, str(args.data_dir), str(out))
    direction = settings.task.direction
    sign = 1.0 if direction == "minimize" else -1.0

    curves = final_curves(study, settings)
    finals = {n: curve[-1] for n, curve in curves.items()}
    median = float(np.median(list(finals.values())))
    best = set(sorted(finals, key=lambda n: sign * finals[n])[:TOP])
    in_study = {t.number: None if t.state == TrialState.COMPLETE else -1 for t in study.trials if t.number in curves}
    old_pruner, old_steps = epoch_indexed()
    report = {
        "study": {"storage": storage, "name": args.study_name, "trials": len(curves)},
        "median_final": median,
        f"top{TOP}": sorted(best),
        "finals": finals,
        "curves": curves,
        "as_the_study_ran": tally(in_study, finals, median, best, sign),
        "epoch_indexed": tally(replay(old_pruner, curves, direction, old_steps), finals, median, best, sign),
        "fraction_of_schedule": tally(replay(make_pruner(), curves, direction), finals, median, best, sign),
    }
    files.write_json(out / "pruning_replay.json", report, "the replay's report")
    best_final = min(finals.values(), key=lambda v: sign * v)
    print(f"\n{len(curves)} trials run to their end: median {median:.5f}, best {best_final:.5f}")
    for name in ("as_the_study_ran", "epoch_indexed", "fraction_of_schedule"):
        row = report[name]
        print(
            f"{name:22s} pruned {row['pruned']:2d}, of which {row['pruned_beating_median']:2d} would have beaten the "
            f"median and {row[f'pruned_among_top{TOP}']} were among the {TOP} best; best kept {row['best_kept']:.5f}"
        )
    print(f"wrote {out / 'pruning_replay.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
