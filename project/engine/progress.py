"""Progress of long fits: a Fashion-MNIST trial or a refit takes minutes, a House Prices fit seconds.

A fit that has run for ``after`` seconds shows its epochs from then on, on standard error: a bar on
a terminal, else one line per epoch (a log file, a batch job), at most one every ``every`` seconds
where epochs are shorter. Shorter fits, the many small ones of a tabular sweep, show nothing.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO, cast

import lightning as L
from tqdm import tqdm

from project.engine.module import FoldModule


class EpochProgress(L.Callback):
    def __init__(self, label: str, after: float = 10.0, every: float = 5.0, stream: TextIO | None = None) -> None:
        self.label, self.after, self.every, self.stream = label, after, every, stream or sys.stderr
        self.started, self.printed = 0.0, 0.0
        self.bar: tqdm | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started, self.printed, self.bar = time.monotonic(), 0.0, None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.monotonic() - self.started
        history = cast(FoldModule, pl_module).history
        if elapsed < self.after or not history:
            return
        record, epoch = history[-1], trainer.current_epoch + 1
        figures = ", ".join(f"{key} {sum(value) / len(value):.4f}" for key, value in record.items() if key != "epoch")
        if self.stream.isatty():
            if self.bar is None:
                self.bar = tqdm(
                    total=trainer.max_epochs,
                    initial=epoch - 1,
                    desc=self.label,
                    unit="epoch",
                    file=self.stream,
                    leave=False,
                    dynamic_ncols=True,
                )
            self.bar.set_postfix_str(figures, refresh=False)
            self.bar.update(1)
        elif elapsed - self.printed >= self.every or epoch == trainer.max_epochs:
            self.printed = elapsed
            print(
                f"{self.label}: epoch {epoch}/{trainer.max_epochs}, {figures} ({elapsed:.0f} s)",
                file=self.stream,
                flush=True,
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.close()
