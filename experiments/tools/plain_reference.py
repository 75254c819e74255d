"""The plain PyTorch reference on its own, in a process of its own: a check on the benchmark.

    python experiments/tools/plain_reference.py --json plain.json

The training loop here is written out again, as the d2l chapters write it (``nn.Sequential``,
``torch.optim.AdamW`` with its defaults, ``randperm`` mini-batches, one fold after another), and
shares no code with ``benchmark.py`` or the project's training path; only the data (same folds, same
preprocessing) comes from the project's DataModules, loaded before any timing. Its seconds should
agree with the ``plain_s`` column of ``benchmark.py`` for the same cases, run close in time: on a
shared machine both move with its load.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from project.cli import positive_int
from project.data import DataError
from project.tasks import get_task
from project.utils import files
from project.utils.paths import REPO_ROOT

# name: (task, hidden sizes, batch size, epochs, learning rate, weight decay, folds), as in benchmark.py
CASES = {
    "fashion-mnist-epoch": ("fashion-mnist", (256, 256), 256, 1, 1e-3, 0.0, [0]),
    "house-prices-5fold-linear": ("house-prices", (), 64, 100, 1e-2, 0.0, [0, 1, 2, 3, 4]),
    "house-prices-5fold-mlp": ("house-prices", (256,), 64, 100, 1e-3, 1e-2, [0, 1, 2, 3, 4]),
}


def load_folds(task_name: str, data_dir: Path, folds: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """(x_train, y_train, x_val, y_val) per fold, as float tensors in memory."""
    task = get_task(task_name)
    dm = task.prepared(data_dir, n_folds=5, fold=folds)
    out = []
    for position in range(len(folds)):
        member = dm.members.select([position])
        train, val = member.train_rows[0], member.val_rows[0]
        x, x_val = (member.features.gather(rows[None])[0].flatten(1) for rows in (train, val))
        out.append((x, dm.targets[train], x_val, dm.targets[val]))
    return out


def train_fold(x, y, x_val, y_val, hidden, batch_size, epochs, lr, weight_decay, classes: int) -> float:
    sizes = [x.shape[1], *hidden]
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(sizes[-1], classes or 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss() if classes else nn.MSELoss()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            out = net(x[idx])
            loss = loss_fn(out, y[idx]) if classes else loss_fn(out[:, 0], y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            out = net(x_val)
            score = (out.argmax(1) == y_val).float().mean() if classes else (out[:, 0] - y_val).square().mean().sqrt()
    return float(score)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="runs per case; the median is reported")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    chosen = args.cases.split(",")
    unknown = [c for c in chosen if c not in CASES]
    if unknown:
        parser.error(f"argument --cases: unknown {unknown}; expected some of {', '.join(CASES)}")
    results = []
    for name in chosen:
        task_name, hidden, batch_size, epochs, lr, weight_decay, folds = CASES[name]
        try:
            data = load_folds(task_name, args.data_dir, folds)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        classes = 10 if task_name != "house-prices" else 0

        def run(data=data, settings=(hidden, batch_size, epochs, lr, weight_decay, classes)):
            for seed, fold in enumerate(data):
                torch.manual_seed(seed)
                train_fold(*fold, *settings)

        run()  # warm-up
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            seconds.append(time.perf_counter() - start)
        results.append(
            {"name": name, "plain_s": round(statistics.median(seconds), 3), "runs_s": [round(s, 3) for s in seconds]}
        )
        print(f"{name:<28}{results[-1]['plain_s']:>8.2f} s   runs: {results[-1]['runs_s']}", flush=True)
    if args.json:
        files.write_json(args.json, {"cases": results, "torch_threads": torch.get_num_threads()}, "the figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
