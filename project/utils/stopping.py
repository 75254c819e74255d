"""A clean stop on request: Ctrl-C (SIGINT) or SIGTERM (a batch scheduler, ``timeout``).

The first signal asks the process to stop at its next safe point: after the current training
step (``StopOnRequest``, a Lightning callback every fit carries), or before the next trial starts.
There ``check()`` raises ``Interrupted``, which the sweep and ``train.py`` turn into ended runs,
a summary of what finished, and exit code 128 + the signal (130 for Ctrl-C, 143 for SIGTERM).
A second signal exits at once, as kill -9 would: the next command recovers what it left.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import lightning as L

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_children: list[int] = []  # worker processes a stop request is passed on to


class Interrupted(Exception):
    """A stop asked for by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def requested() -> int | None:
    """The signal that asked for a stop, if one did."""
    return _received[0] if _received else None


def check() -> None:
    """Raise ``Interrupted`` if a stop was asked for."""
    if _received:
        raise Interrupted(_received[0])


@contextmanager
def handling_signals() -> Iterator[None]:
    """Within this block, SIGINT and SIGTERM ask for a stop: the first records the request, says so
    and passes it on to the worker processes (``forwarding_to``); a second kills them and exits at
    once with 128 + the signal. Python's own handlers come back after it."""

    def handler(signum: int, frame) -> None:
        if _received:
            for pid in _children:
                _signal(pid, signal.SIGKILL)
            os._exit(128 + signum)
        _received.append(signum)
        print(
            f"\n{signal.Signals(signum).name}: stopping after the current step (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        for pid in _children:
            _signal(pid, signum)

    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _received.clear()


@contextmanager
def forwarding_to(pids: list[int]) -> Iterator[None]:
    """While in this block, a stop request is passed on to these processes (a terminal's Ctrl-C
    reaches them itself; a scheduler's SIGTERM reaches only this one)."""
    _children[:] = pids
    for pid in pids if _received else ():  # asked before these processes were known
        _signal(pid, _received[0])
    try:
        yield
    finally:
        _children.clear()


def _signal(pid: int, signum: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signum)


def install_for_worker() -> None:
    """A sweep's worker process: it stops on the first signal, whether the terminal sent it to the
    whole process group or its coordinator forwarded it (so it may come twice), and leaves the
    message and the hard stop of a second Ctrl-C to the coordinator."""

    def handler(signum: int, frame) -> None:
        if not _received:
            _received.append(signum)

    for signum in SIGNALS:
        signal.signal(signum, handler)


class StopOnRequest(L.Callback):
    """Stops a fit after the current training or validation step once a stop was asked for."""

    def on_train_batch_end(self, *args) -> None:
        check()

    def on_validation_batch_end(self, *args) -> None:
        check()
