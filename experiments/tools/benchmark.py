"""Side by side in one process: the plain PyTorch loop of the d2l chapters against this project's path.

    python experiments/tools/benchmark.py --json bench.json

Each case trains the same model with the same optimiser, epochs, batch size, folds and data on
both paths and reports the median of --repeats runs (imports and data loading excluded). The plain
reference keeps tensors in memory, draws batches from ``randperm``, validates 4096 rows per forward
pass and fits the folds one by one. The project's path is what a run of it does: its validation
passes hold at most ``project.data.base.EVAL_ELEMENTS`` inputs, so images go a few hundred at a time.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from project.cli import positive_int
from project.config import TrainConfig
from project.cv import cross_validate
from project.data import DataError
from project.models import create_model
from project.tasks import get_task
from project.utils import files
from project.utils.paths import REPO_ROOT

EVAL_ROWS = 4096  # validation rows per forward pass of the plain loop
DEVICE = torch.device("cpu")  # where both sides train: --device


def plain_fit(x_train, y_train, x_val, y_val, config: TrainConfig, out_features: int, classification: bool, seed: int):
    """The d2l-style loop over the same plain model: AdamW, randperm mini-batches, a validation pass
    per epoch; on the device its tensors are on."""
    # torch's defaults, whatever global flags the project's Trainer left set in this process
    torch.use_deterministic_algorithms(False)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.set_flush_denormal(False)
    torch.manual_seed(seed)
    net = create_model(config.model, tuple(x_train.shape[1:]), out_features, **config.model_kwargs).to(x_train.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
    for _ in range(config.max_epochs):
        net.train()
        for idx in torch.randperm(len(x_train), device=x_train.device).split(config.batch_size):
            out = net(x_train[idx])
            loss = loss_fn(out, y_train[idx]) if classification else loss_fn(out.squeeze(-1), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.no_grad():
            out = torch.cat([net(part) for part in x_val.split(EVAL_ROWS)])
            if classification:
                score = (out.argmax(1) == y_val).float().mean()
            else:
                score = (out.squeeze(-1) - y_val).square().mean().sqrt()
    return float(score)


def fold_tensors(datamodule, position: int, device: torch.device | None = None):
    members = datamodule.members.select([position])
    rows_tr, rows_va = members.train_rows[0], members.val_rows[0]
    x_tr = members.features.gather(rows_tr[None])[0]
    x_va = members.features.gather(rows_va[None])[0]
    return tuple(t.to(device or DEVICE) for t in (x_tr, datamodule.targets[rows_tr], x_va, datamodule.targets[rows_va]))


def timed(fns, repeats: int) -> list[float]:
    """Median seconds of each function; runs alternate, so a change in the machine's load
    during the case reaches every side alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            start = time.perf_counter()
            fn()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_mb() -> float | None:
    """The most GPU memory this process has held (its own allocations), None without CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def case_folds(
    name: str, task_name: str, data_dir: Path, config: TrainConfig, folds: list[int], stacking: str, repeats: int
) -> dict:
    task = get_task(task_name)
    dm = task.prepared(data_dir, n_folds=5, fold=folds)
    tensors = [fold_tensors(dm, p) for p in range(len(folds))]
    classification = task.kind == "classification"

    def plain():
        for p, t in enumerate(tensors):
            plain_fit(*t, config, dm.out_features, classification, seed=p)

    layouts = []

    def project():
        layouts.append(cross_validate(task, config, datamodule=dm, stacking=stacking).layout)

    plain(), project()  # warm-up: first-call allocations, kernel selection, the engine's layout measurement
    plain_s, project_s = timed([plain, project], repeats)
    return {
        "name": name,
        "plain_s": round(plain_s, 3),
        "project_s": round(project_s, 3),
        "ratio": round(project_s / plain_s, 3),
        "peak_mem_mb": round(peak_mb(), 1),
        "gpu_peak_mb": gpu_peak_mb(),
        "layout": layouts[-1],
    }


def case_sweep(data_dir: Path, n_trials: int) -> dict:
    """Trials per minute: a plain sequential loop over configurations vs the sweep's workers."""
    import optuna

    from project.sweep.space import config_from_params, suggest_config
    from project.sweep.study import SweepSettings, open_study, run_workers
    from project.tracking.tracker import Tracker

    task = get_task("house-prices")
    fixed = {"max_epochs": 60}
    dm = task.prepared(data_dir, n_folds=5, fold=list(range(5)))
    tensors = [fold_tensors(dm, p) for p in range(5)]
    # the same configurations on both sides: random draws from the search space, with the plain
    # loop's AdamW, constant learning rate and no linear path, enqueued into the sweep's study
    space = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    param_sets = []
    for _ in range(n_trials):
        trial = space.ask()
        suggest_config(trial, task, "mlp", fixed)
        params = {**trial.params, "scheduler": "none", "optimizer": "adamw"}
        if "linear_skip" in params:
            params["linear_skip"] = False
        param_sets.append(params)
    configs = [config_from_params(task, "mlp", params, fixed) for params in param_sets]

    def plain():
        for config in configs:
            for p, t in enumerate(tensors):
                plain_fit(*t, config, 1, False, seed=p)

    with tempfile.TemporaryDirectory() as tmp:
        jobs = os.cpu_count() or 1
        settings = SweepSettings(
            preset=task.preset.resolved(),
            data_dir=str(data_dir),
            seed=0,
            storage=f"sqlite:///{tmp}/optuna.db",
            study_name="bench",
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            experiment_name="bench",
            fixed=fixed,
            threads=max(1, (os.cpu_count() or 1) // jobs),
            pruning=False,
        )
        study = open_study(settings)
        for params in param_sets:
            study.enqueue_trial(params)
        tracker = Tracker(settings.tracking_uri, settings.experiment_name)  # the coordinator's, as in sweep.py
        start = time.perf_counter()
        run_workers(settings, n_trials, jobs, None, tracker)
        project_s = time.perf_counter() - start
    (plain_s,) = timed([plain], 1)
    return {
        "name": "sweep-throughput",
        "plain_s": round(plain_s, 3),
        "project_s": round(project_s, 3),
        "ratio": round(project_s / plain_s, 3),
        "peak_mem_mb": round(peak_mb(), 1),
        "plain_trials_per_min": round(60 * n_trials / plain_s, 1),
        "project_trials_per_min": round(60 * n_trials / project_s, 1),
        "workers": jobs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / "data", help="(default: data/)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="runs per case; the median is reported")
    parser.add_argument(
        "--sweep-trials",
        type=positive_int,
        default=12,
        help="trials (5 folds, 60 epochs each) in the sweep-throughput case (default: %(default)s)",
    )
    parser.add_argument("--cases", default="all", help="comma-separated case names (default: all)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where both sides train (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but torch sees no CUDA GPU here")
    if args.device == "cpu":  # the project's side (and the sweep's workers) as on a machine without one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    global DEVICE
    DEVICE = torch.device(args.device)
    image = TrainConfig(model_kwargs={"hidden_sizes": (256, 256)}, batch_size=256, max_epochs=1, lr=1e-3)
    linear = TrainConfig(model_kwargs={"hidden_sizes": ()}, batch_size=64, max_epochs=100, lr=1e-2)
    mlp = TrainConfig(model_kwargs={"hidden_sizes": (256,)}, batch_size=64, max_epochs=100, lr=1e-3, weight_decay=1e-2)
    # the CNN this case has timed since it was written (32-bit, as the plain side trains), not the preset's
    cnn = get_task("fashion-mnist").config(
        "cnn",
        max_epochs=1,
        batch_size=128,
        lr=3e-3,
        weight_decay=1e-4,
        scheduler="none",
        label_smoothing=0.0,
        precision="32-true",
        channels_last=False,
        model_kwargs={"channels": (16, 32), "hidden": 128, "dropout": 0.25, "convs": 1, "norm": "group"},
    )
    five = list(range(5))
    fold_cases = {
        "fashion-mnist-epoch": ("fashion-mnist", image, [0], "auto"),
        "house-prices-5fold-linear": ("house-prices", linear, five, "auto"),
        "house-prices-5fold-mlp": ("house-prices", mlp, five, "auto"),
        "house-prices-5fold-mlp-generic": ("house-prices", mlp, five, "vmap"),
        "fashion-mnist-cnn-5fold-epoch": ("fashion-mnist", cnn, five, "auto"),
    }
    cases = [*fold_cases, "sweep-throughput"]
    chosen = cases if args.cases == "all" else args.cases.split(",")
    unknown = [c for c in chosen if c not in cases]
    if unknown:
        parser.error(f"argument --cases: unknown {unknown}; expected some of {', '.join(cases)}")
    results = []
    print(
        f"{'case':<32}{'plain s':>10}{'project s':>11}{'ratio':>8}{'peak MB':>10}{'GPU MB':>8}  folds "
        f"(on {args.device})"
    )
    try:
        for name in chosen:
            if name in fold_cases:
                task_name, config, folds, stacking = fold_cases[name]
                row = case_folds(name, task_name, args.data_dir, config, folds, stacking, args.repeats)
            else:
                row = case_sweep(args.data_dir, args.sweep_trials)
            results.append(row)
            gpu = "" if row.get("gpu_peak_mb") is None else f"{row['gpu_peak_mb']:.0f}"
            print(
                f"{row['name']:<32}{row['plain_s']:>10.2f}{row['project_s']:>11.2f}{row['ratio']:>8.2f}"
                f"{row['peak_mem_mb']:>10.0f}{gpu:>8}  {row.get('layout', '')}",
                flush=True,
            )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:  # the cases already measured are kept, whatever stops the run
        if args.json:
            payload = {
                "cases": results,
                "torch_threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "device": args.device,
            }
            files.write_json(args.json, payload, "the benchmark's figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
