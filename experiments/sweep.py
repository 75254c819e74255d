"""Optuna sweep under K-fold CV, tracked in MLflow: the main job of the template.

    python experiments/sweep.py                         # House Prices, 5 folds, resumable study
    python experiments/sweep.py --n-trials 2            # two more trials in the same study
    python experiments/sweep.py --task fashion-mnist    # one stratified validation fold (docs/results.md)

Running the same command again resumes the study stored in --storage.
"""

from __future__ import annotations

import argparse
import sys

from project.cli import add_common_arguments, add_sweep_arguments, sweep_settings
from project.utils.output import quiet_libraries


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    add_sweep_arguments(parser)
    return parser.parse_args(argv), parser


def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    from project.sweep.run import CannotStart, run_sweep  # after the flags: --help answers at once
    from project.utils.stopping import handling_signals

    quiet_libraries(args.verbose)  # once they are imported: MLflow and Optuna set their loggers then

    with handling_signals():  # Ctrl-C or SIGTERM: a clean stop, see project/utils/stopping.py
        settings, n_trials, n_jobs = sweep_settings(args, parser, entry_point=__file__)
        try:
            return run_sweep(settings, n_trials, n_jobs, args.timeout)
        except CannotStart as err:
            parser.error(str(err))


if __name__ == "__main__":
    sys.exit(main())
