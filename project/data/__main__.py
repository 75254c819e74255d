"""``python -m project.data [DATASET ...]``: fetch and verify the raw data files."""

import argparse
import sys
from pathlib import Path

from project.data.errors import DataError
from project.data.sources import DATASETS, fetch_dataset
from project.utils.paths import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m project.data", description=__doc__)
    parser.add_argument(
        "datasets", nargs="*", metavar="DATASET", help=f"datasets to fetch, of {', '.join(DATASETS)} (default: all)"
    )
    parser.add_argument(
        "--data-dir", type=Path, default=REPO_ROOT / "data", help="where the files land (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        parser.error(f"argument DATASET: unknown {', '.join(unknown)}; expected {', '.join(DATASETS)}")
    try:
        for dataset in args.datasets or DATASETS:
            paths = fetch_dataset(dataset, args.data_dir)
            print(f"{dataset}: {len(paths)} files verified in {args.data_dir / dataset}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
