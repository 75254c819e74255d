"""Milliseconds a training step of the CNN takes in plain PyTorch: 32-bit, bfloat16 autocast, and
bfloat16 with channels-last weights, side by side in one process (docs/results.md).

    python experiments/tools/conv_steps.py
    python experiments/tools/conv_steps.py --batch-size 256 --steps 30

Each net is the ``cnn`` model built as a fit builds it (``project.cv.init_model``), on 28x28 grey
images, stepped by AdamW on random images and labels (a step's time does not depend on the
pixels); each setting's figure is the median of ``--repeats`` timings of ``--steps`` steps after
three warm-up steps, the settings alternating.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

from project.config import TrainConfig
from project.cv import init_model

NETS = {
    "(16, 32), one conv a block, GroupNorm": {"channels": (16, 32)},
    "(16, 32), one conv a block, BatchNorm": {"channels": (16, 32), "norm": "batch"},
    "(16, 32), two convs a block, BatchNorm": {"channels": (16, 32), "convs": 2, "norm": "batch"},
    "(24, 48), two convs a block, BatchNorm": {"channels": (24, 48), "convs": 2, "norm": "batch"},
    "(32, 64), two convs a block, BatchNorm": {"channels": (32, 64), "convs": 2, "norm": "batch"},
}
SETTINGS = {"fp32": (False, False), "bf16": (True, False), "bf16 channels-last": (True, True)}


def stepper(arguments: dict, bf16: bool, channels_last: bool, batch_size: int):
    torch.manual_seed(0)
    net = init_model(TrainConfig(model="cnn", model_kwargs=arguments, channels_last=channels_last), (1, 28, 28), 10, 0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="steps a timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timings a setting (default: %(default)s)")
    args = parser.parse_args(argv)
    print(f"{'net':<42}" + "".join(f"{name:>20}" for name in SETTINGS) + "   (ms a step)")
    for label, arguments in NETS.items():
        steps = {name: stepper(arguments, *flags, args.batch_size) for name, flags in SETTINGS.items()}
        times: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps * 1000)
        print(f"{label:<42}" + "".join(f"{statistics.median(t):>20.1f}" for t in times.values()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
