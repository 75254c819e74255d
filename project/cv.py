"""Fit one configuration on K folds and return the per-fold validation scores.

Each fold's model is a fresh copy of the configured plain model, initialised from its own seed.
The K copies train at once as one member stack (one Trainer) where that is faster, else one
after another (``project.engine.layout`` decides, or ``stacking``): either way each fold has its
own initialisation, batches, optimiser state and dropout masks.
"""

from __future__ import annotations

import logging
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn

from project.config import TrainConfig, instantiate
from project.config.schema import Precision
from project.data import FoldDataModule
from project.data.base import Members
from project.engine import FirstLayer, FoldModule, Layout, build_stack, choose_first_layer, choose_layout, chunked
from project.engine.progress import EpochProgress
from project.engine.stacking import hand_stacked_form
from project.models import create_model
from project.tasks import Task
from project.utils.devices import deterministic_algorithms, training_device
from project.utils.seeds import derive_seed
from project.utils.stopping import Interrupted, StopOnRequest

for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.WARNING)  # one fit per fold: the banners would drown the output
warnings.filterwarnings("ignore", message=".*LeafSpec.*is deprecated")  # raised inside Lightning itself
warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")  # refits
STACKING = ("auto", "vmap", "sequential")
CPU = torch.device("cpu")


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; names the fold and epoch."""

    def __init__(self, fold: int | None, epoch: int) -> None:
        where = "the full training set" if fold is None else f"fold {fold}"
        super().__init__(f"training loss became NaN or infinite on {where} at epoch {epoch}")
        self.fold, self.epoch = fold, epoch


@dataclass
class Fit:
    """A trained module, the members it holds, and the device it trained on (where it predicts;
    Lightning hands the module back on the CPU)."""

    module: FoldModule
    members: Members
    device: torch.device = CPU


@dataclass
class CVResult:
    metric: str
    fold_scores: list[float]
    history: list[list[dict]]  # per fold, one record per epoch: train_loss, val_<metric>
    seconds: float
    fits: list[Fit] = field(default_factory=list, repr=False)
    layout: str = ""  # how the folds were trained, and why

    @property
    def mean(self) -> float:
        return float(np.mean(self.fold_scores))

    @property
    def std(self) -> float:
        return float(np.std(self.fold_scores))


def make_trainer(
    max_epochs: int,
    callbacks: Sequence[L.Callback] = (),
    validate: bool = True,
    accelerator: str = "auto",
    precision: Precision = "32-true",
    deterministic: bool | Literal["warn"] = True,
    benchmark: bool = False,
    loggers: Sequence[Logger] = (),
    options: dict[str, Any] | None = None,
) -> L.Trainer:
    """A Trainer for one of many small fits: on one device, with ``loggers`` (none: no logging),
    checkpoints where a ``ModelCheckpoint`` is among ``callbacks``, and no progress bar, summary or
    sanity check unless ``options`` (the preset's ``trainer`` section, any other Trainer argument)
    says otherwise.

    ``deterministic`` and ``benchmark``: the preset's (see its schema). Deterministic algorithms stay on, but
    torch's filling of every new tensor with NaN under them is switched off: a debugging aid for
    kernels that read memory they never wrote (none here) that costs a pass over each tensor.

    Denormal floats are flushed to zero on the CPU: weights and gradients that a strong weight
    decay drives towards zero pass through them, and x86 CPUs compute on them many times slower
    (docs/speed.md)."""
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]  # public, not in the stubs
    torch.set_flush_denormal(True)
    callbacks = [*callbacks, StopOnRequest()]
    settings: dict[str, Any] = {
        "enable_checkpointing": any(isinstance(c, ModelCheckpoint) for c in callbacks),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "log_every_n_steps": 1,  # a Lightning step holds a chunk of mini-batches: few per epoch
        **(options or {}),
    }
    if not validate:  # the refit: no validation rows
        settings["limit_val_batches"] = 0
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=list(loggers) or False,
        deterministic=deterministic,
        benchmark=benchmark,
        callbacks=callbacks,
        **settings,
    )


def init_model(config: TrainConfig, sample_shape: tuple[int, ...], out_features: int, seed: int) -> nn.Module:
    """One plain model of the configuration, its weights drawn from ``seed`` alone. Every random
    generator it seeds, the CUDA ones too, is restored after."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        model = create_model(config.model, sample_shape, out_features, **config.model_kwargs)
    if config.channels_last:  # Module.to's documented memory_format, absent from its stubs
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def build_module(
    task: Task,
    config: TrainConfig,
    datamodule: FoldDataModule,
    members: Members,
    seed: int,
    hand_stacked: bool = True,
    chunked_steps: bool = True,
) -> FoldModule:
    """The FoldModule of ``members``: a stack of their plain models and the task's head. It steps
    through chunks of mini-batches (``chunked_steps``), which saves Lightning's per-step cost; each
    mini-batch goes through Lightning's step hooks where the preset hands the Trainer anything
    that may watch them (a ``trainer``, ``callbacks`` or ``loggers`` section; project/engine/chunks.py)."""
    models = [
        init_model(config, datamodule.sample_shape, datamodule.out_features, derive_seed(seed, "init", i))
        for i in members.seed_ids
    ]
    net = build_stack(models, config.model, hand_stacked)
    head = task.head(config, [datamodule.targets[rows] for rows in members.train_rows])
    preset = task.preset
    chunks = {"step_hooks": bool(preset.trainer or preset.callbacks or preset.loggers)} if chunked_steps else {}
    return (chunked(FoldModule) if chunked_steps else FoldModule)(
        net,
        head,
        lr=config.lr,
        weight_decay=config.weight_decay,
        optimizer=config.optimizer,
        momentum=config.momentum,
        scheduler=config.scheduler,
        gradient_clip_val=config.gradient_clip_val,
        member_names=[f"fold_{f}" if f is not None else f"seed_{r}" for r, f in enumerate(members.folds)],
        tta_flip=config.tta_flip,
        **chunks,
    )


# what makes a fit's logger of its run: called with the fit's label (``describe``), once per fit
LoggerFactory = Callable[[str], Logger]


def fit(
    task: Task,
    config: TrainConfig,
    datamodule: FoldDataModule,
    seed: int,
    members: Members | None = None,
    callbacks: Sequence[L.Callback] = (),
    accelerator: str = "auto",
    hand_stacked: bool = True,
    chunked_steps: bool = True,
    nonzero: bool | None = None,
    loggers: Sequence[LoggerFactory] = (),
) -> FoldModule:
    """Train ``members`` (default: all the set-up DataModule's) as one stack; raise TrainingDiverged
    on a NaN or infinite loss. ``nonzero``: whether a first layer that can sums the weight rows of
    the rows' nonzero entries (``first_layer`` says; default: wherever it can).

    The Trainer takes the preset's ``trainer`` arguments, and its ``callbacks`` and ``loggers``
    made anew for this fit after ``callbacks`` (the engine's) and ``loggers`` (the run's); the
    DataModule itself is handed to ``trainer.fit``, serving this fit's fold-stacked batches."""
    members = members or datamodule.members
    L.seed_everything(seed, workers=True, verbose=False)
    module = build_module(task, config, datamodule, members, seed, hand_stacked, chunked_steps)
    nonzero = module.net.accepts_nonzero and (nonzero is None or nonzero)
    device = training_device(accelerator)
    train = datamodule.train_loader(
        config.batch_size,
        members,
        chunked=not module.automatic_optimization,
        nonzero=nonzero,
        augment=config.augment,
        device=device,
    )
    val = datamodule.val_loader(members, nonzero=nonzero, device=device)
    label, preset = describe(members), task.preset
    trainer = make_trainer(
        config.max_epochs,
        [*callbacks, EpochProgress(f"{config.model}, {label}"), *own_callbacks(preset.callbacks, members.validates)],
        validate=members.validates,
        accelerator=accelerator,
        precision=config.precision,
        deterministic=preset.deterministic,
        benchmark=preset.benchmark,
        loggers=[*(make(label) for make in loggers), *(made(c) for c in preset.loggers)],
        options=preset.trainer,
    )
    try:
        with datamodule.serving(train, val):
            trainer.fit(module, datamodule=datamodule)
    except SIGTERMException:  # Lightning's own stop on SIGTERM, which also asked ours
        raise Interrupted(signal.SIGTERM) from None
    if module.diverged is not None:
        raise TrainingDiverged(members.folds[module.diverged["members"][0]], module.diverged["epoch"])
    return module


def own_callbacks(entries: list[dict[str, Any]], validates: bool) -> list[L.Callback]:
    """The preset's callbacks, made anew; a fit without validation rows (the refit) leaves out
    those that monitor a validation metric, which it does not log."""
    monitors = (str((entry.get("args") or {}).get("monitor", "")) for entry in entries)
    return [made(entry) for entry, watched in zip(entries, monitors) if validates or not watched.startswith("val/")]


def made(entry: dict[str, Any]) -> Any:
    """A fresh instance of a preset's ``{class: "module:Class", args: {...}}`` (a callback, a logger)."""
    return instantiate(entry["class"], dict(entry.get("args") or {}))


def describe(members: Members) -> str:
    """``fold 2``, ``folds 0-4`` or ``refit, 3 seeds``."""
    if not members.validates:
        return f"refit, {len(members)} seed{'s' * (len(members) > 1)}"
    folds = [f for f in members.folds if f is not None]
    if len(folds) == 1:
        return f"fold {folds[0]}"
    return f"folds {folds[0]}-{folds[-1]}" if folds == list(range(folds[0], folds[-1] + 1)) else f"folds {folds}"


def first_layer(
    task: Task, config: TrainConfig, datamodule: FoldDataModule, members: Members, seed: int, accelerator: str = "auto"
) -> FirstLayer | None:
    """Whether the members' hand-stacked first layer runs on the rows' nonzero entries
    (``choose_first_layer``); None where the rows are not sparse or the model has no hand-stacked
    form that can use them (no other stack is built here: a model of one's own may not stack)."""
    if datamodule.members.features.nonzero is None:
        return None
    models = [
        init_model(config, datamodule.sample_shape, datamodule.out_features, derive_seed(seed, "init", i))
        for i in members.seed_ids
    ]
    if hand_stacked_form(models[0]) is None:
        return None
    device = training_device(accelerator)
    stack = build_stack(models, config.model).to(device)
    if not stack.accepts_nonzero:
        return None
    batch = next(iter(datamodule.train_loader(config.batch_size, members, chunked=False, nonzero=True, device=device)))
    key = (config.model, repr(sorted(config.model_kwargs.items())))
    with deterministic_algorithms(task.preset.deterministic):
        return choose_first_layer(stack, batch["x"], key, task.preset.benchmark)


def fold_layout(
    task: Task, config: TrainConfig, datamodule: FoldDataModule, members: int, seed: int, accelerator: str = "auto"
) -> Layout:
    """Whether ``members`` folds of ``config`` train stacked or one after another (``project.engine.layout``)."""

    def make(count: int) -> list[nn.Module]:
        return [
            init_model(config, datamodule.sample_shape, datamodule.out_features, derive_seed(seed, "init", i))
            for i in range(count)
        ]

    key = (config.model, repr(sorted(config.model_kwargs.items())))
    with deterministic_algorithms(task.preset.deterministic):  # probed (and timed) as the Trainer will train
        return choose_layout(
            make,
            config.model,
            key,
            datamodule.sample_shape,
            config.batch_size,
            members,
            training_device(accelerator),
            benchmark=task.preset.benchmark,
        )


def cross_validate(
    task: Task,
    config: TrainConfig,
    data_dir: str = "data",
    n_folds: int = 5,
    seed: int = 0,
    stacking: str = "auto",
    callbacks: Sequence[L.Callback] = (),
    datamodule: FoldDataModule | None = None,
    accelerator: str = "auto",
    loggers: Sequence[LoggerFactory] = (),
) -> CVResult:
    """K-fold CV of one configuration: the same folds for every configuration, seeded throughout.

    ``stacking``: ``"auto"`` (the model's hand-stacked form where it has one, else stacked or
    sequential as measured), ``"vmap"`` (always the generic torch.func stack) or ``"sequential"``.
    ``datamodule`` may be a set-up DataModule over all folds (``fold=list(range(K))``), reused
    across calls to skip re-reading and re-fitting the preprocessing. ``loggers`` make each fit's
    loggers of the run (``project.tracking.logger.RunLogger``), beside the preset's.
    """
    if stacking not in STACKING:
        raise ValueError(f"stacking {stacking!r} is unknown: expected one of {', '.join(STACKING)}")
    start = time.perf_counter()
    if datamodule is None:
        datamodule = task.prepared(data_dir, n_folds=n_folds, fold=list(range(n_folds)), seed=seed)
    members = datamodule.members
    if stacking == "sequential":
        layout = Layout(False, "asked for")
    elif stacking == "vmap":
        layout = Layout(True, "asked for")
    else:
        layout = fold_layout(task, config, datamodule, len(members), seed, accelerator)
    trick = first_layer(task, config, datamodule, members, seed, accelerator) if stacking != "vmap" else None
    nonzero, device = None if trick is None else trick.nonzero, training_device(accelerator)
    if layout.stacked:
        module = fit(
            task,
            config,
            datamodule,
            seed,
            members,
            callbacks,
            accelerator,
            hand_stacked=stacking != "vmap",
            nonzero=nonzero,
            loggers=loggers,
        )
        fits = [Fit(module, members, device)]
    else:
        fits = []
        for position in range(len(members)):
            one = members.select([position])
            fits.append(
                Fit(
                    fit(task, config, datamodule, seed, one, callbacks, accelerator, nonzero=nonzero, loggers=loggers),
                    one,
                    device,
                )
            )
            if any(getattr(callback, "stopped", False) for callback in callbacks):
                break  # a callback (the sweep's pruner) ended this configuration early
    histories = [h for f in fits for h in _split_history(f.module.history, len(f.members))]
    key = f"val_{task.metric}"
    scores = [h[-1][key] for h in histories]
    said = layout.describe(fits[0].module.net.kind)
    if trick is not None:
        said = f"{said[:-1]}; {trick.describe()})"
    return CVResult(task.metric, scores, histories, time.perf_counter() - start, fits, said)


def _split_history(history: list[dict], members: int) -> list[list[dict]]:
    """Per-member histories from a stacked one (lists of M values become scalars)."""
    return [
        [{k: (v[m] if isinstance(v, list) else v) for k, v in record.items()} for record in history]
        for m in range(members)
    ]


@torch.no_grad()
def predict_members(
    module: FoldModule, datamodule: FoldDataModule, members: Members, device: torch.device = CPU
) -> torch.Tensor:
    """Outputs of each member of ``module`` on the test set, ``[M, N, ...]``, computed on ``device``."""
    module.to(device).eval()
    loader = datamodule.test_loader(members, nonzero=module.net.accepts_nonzero, with_targets=False, device=device)
    outputs = [module.predict_step(batch, 0).cpu() for batch in loader]
    return torch.cat(outputs, dim=1)
