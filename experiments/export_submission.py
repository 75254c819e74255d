"""Rebuild the deliverables of a finished sweep from its stored study, without re-running the sweep.

python experiments/export_submission.py                       # the default House Prices study
python experiments/export_submission.py --submit              # and send it to Kaggle
python experiments/export_submission.py --study-name fashion-mnist
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from project.cli import add_ensemble_argument, output_dir
from project.utils.output import quiet_libraries
from project.utils.paths import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--study-name",
        default="house-prices",
        help="the study, named as the sweep named it: the preset, then -<model> for another model "
        "than the preset's (default: %(default)s)",
    )
    parser.add_argument(
        "--storage", default=None, help="Optuna storage URL (default: sqlite:///<output-dir>/optuna.db)"
    )
    parser.add_argument("--output-dir", type=Path, default=None, help="(default: experiments/outputs/<study-name>/)")
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: as the sweep)")
    parser.add_argument("--submit", action="store_true", help="send the submission with the Kaggle API")
    add_ensemble_argument(parser)
    parser.add_argument("--verbose", action="store_true", help="also the libraries' INFO lines (MLflow's, Optuna's)")
    args = parser.parse_args(argv)
    # after the flags: --help answers at once
    import optuna

    from project.data.sources import KAGGLE_COMPETITION, kaggle_credentials
    from project.sweep.export import NoCompleteTrial, export_best
    from project.sweep.run import PARENT_ATTR
    from project.sweep.study import PRESET_ATTR, SweepSettings, default_storage, make_storage
    from project.tracking.tracker import resolve_tracking_uri
    from project.utils.files import WriteFailed

    quiet_libraries(args.verbose)  # once they are imported: MLflow and Optuna set their loggers then
    name = args.study_name
    out = output_dir(args, parser, name)
    storage = args.storage or default_storage(out)
    try:
        study = optuna.load_study(study_name=name, storage=make_storage(storage))
    except (KeyError, ValueError) as err:
        parser.error(f"argument --study-name/--storage: no study {name!r} in {storage}: {err}")
    if PRESET_ATTR not in study.user_attrs:
        parser.error(
            f"argument --study-name: study {name!r} in {storage} stores no preset; run the sweep again "
            "with a new --study-name"
        )
    settings = SweepSettings.of_study(study, storage, str(args.data_dir), str(out), ensemble=args.ensemble)
    task = settings.task
    settings.tracking_uri = resolve_tracking_uri(args.tracking_uri)
    tracker = settings.tracker()
    tracker.send_kept()  # what the sweep could not log
    try:
        summary = export_best(study, settings, tracker, out, study.user_attrs.get(PARENT_ATTR))
    except NoCompleteTrial as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except WriteFailed as err:
        tracker.send_kept(left_for="the next command on this study")
        print(
            f"error: {err}; nothing half-written was left: once there is room, run this command again", file=sys.stderr
        )
        return 1
    tracker.send_kept(left_for="the next command on this study")
    rerun = "" if summary["cv_mean_rerun"] is None else f" (re-run {summary['cv_mean_rerun']:.5f})"
    print(
        f"best trial {summary['best_trial']}: cv_{task.metric} {summary['cv_mean']:.5f}{rerun}; "
        f"wrote {out / 'summary.json'}"
    )
    print(f"submission: {summary['submission']}")
    if summary.get("estimator_errors"):
        return 1
    if not args.submit:
        return 0
    if not kaggle_credentials():
        print(
            "error: --submit needs Kaggle credentials: create an API token on kaggle.com (Account -> API), "
            "save it as ~/.kaggle/kaggle.json (chmod 600), and `pip install kaggle`",
            file=sys.stderr,
        )
        return 1
    return subprocess.call(
        [
            "kaggle",
            "competitions",
            "submit",
            "-c",
            KAGGLE_COMPETITION,
            "-f",
            summary["submission"],
            "-m",
            f"study {name} trial {summary['best_trial']} cv {summary['cv_mean']:.5f}",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
