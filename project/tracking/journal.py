"""MLflow writes that could not reach the tracking server, kept on disk and sent once it is back.

A ``Tracker`` given a folder for them (``mlflow-pending/`` in the sweep's or train.py's output
folder) waits at most one bounded request on a server that has gone away. From then on its writes
are appended to this process's journal, one JSON line each, and every ``PROBE_EVERY`` seconds one
write tries the server again by sending the journal. A run created meanwhile gets a local id
(``pending-...``); sending its creation makes the real run and records the pair in ``ids.json``,
through which every tracker reads its run ids.

Each process appends to a file of its own and holds a lock on it for as long as it lives: the
send at the end of a command, or at the start of the next one, takes the files of processes that
have ended (or died) and leaves a live one's alone. An artifact is copied into the folder when its
write is deferred, since the file it came from may change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import requests
from mlflow.exceptions import MlflowException, RestException

from project.utils import files

PENDING_PREFIX = "pending-"
PROBE_EVERY = 20.0  # seconds between attempts to reach a server that was unreachable
IDS = "ids.json"


def is_unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the tracking server could not be reached or did not answer in time
    (not that it answered with an error, such as a run that does not exist)."""
    if isinstance(err, RestException):
        return False
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (requests.exceptions.RequestException, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, MlflowException) and "API request to" in str(err)


def why_unreachable(err: BaseException) -> str:
    """The short reason in an error that ``is_unreachable``: "[Errno 111] Connection refused", "read timed out"."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\")(]+", text) or re.search(r"(read|connect)\w* timed? ?out", text, re.I)
    return found.group(0).strip(" .,:") if found else text.splitlines()[0][:120]


class Unresolved(Exception):
    """A deferred call names a run whose own creation is still waiting in another journal."""


class Journal:
    """This process's deferred MLflow calls and the local ids of the runs they create."""

    def __init__(self, folder: Path, command: str) -> None:
        self.folder, self.command = Path(folder), command
        self.path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self._handle: IO[str] | None = None

    @property
    def holding(self) -> bool:
        """Whether this process has calls waiting in its journal."""
        return self._handle is not None

    def new_run_id(self) -> str:
        return PENDING_PREFIX + uuid.uuid4().hex

    def first_to_say(self) -> bool:
        """True once per command: the first process of it to find the server unreachable says so."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.folder / f"said-{self.command}", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return False
        return True

    def append(self, op: str, args: dict) -> None:
        try:
            if op == "log_artifact":  # keep the file as it is now
                copy = self.folder / "files" / uuid.uuid4().hex / Path(args["path"]).name
                copy.parent.mkdir(parents=True)
                with files.atomic_path(copy, "a copy of an MLflow artifact") as tmp:
                    shutil.copyfile(args["path"], tmp)
                args = {**args, "path": str(copy)}
            if self._handle is None:
                self._handle = self._open_own()
            self._handle.write(json.dumps({"op": op, "args": args}) + "\n")
            self._handle.flush()
            os.fsync(self._handle.fileno())
        except OSError as err:
            if files.unwritable(err):
                raise files.WriteFailed(self.path, "the MLflow journal", err) from None
            raise

    def _open_own(self) -> IO[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle

    def resolve(self, value: str) -> str:
        """A run id as the server knows it (a local id is replaced once its run was created)."""
        if not isinstance(value, str) or not value.startswith(PENDING_PREFIX):
            return value
        return self._ids().get(value, value)

    def _ids(self) -> dict[str, str]:
        try:
            return json.loads((self.folder / IDS).read_text())
        except FileNotFoundError:
            return {}

    def record(self, local: str, real: str) -> None:
        with self._ids_lock():
            ids = {**self._ids(), local: real}
            files.write_text(self.folder / IDS, json.dumps(ids), "the MLflow journal's run ids")

    @contextlib.contextmanager
    def _ids_lock(self) -> Iterator[None]:
        with open(self.folder / f"{IDS}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def send(self, call: Callable[[str, dict], object], everyone: bool = False) -> int:
        """Send this process's journal (``everyone``: also those of processes that have ended)
        through ``call(op, args)``, in order, each file as far as it can go; returns how many calls
        were sent. The server's error stops it; what was sent stays sent."""
        files = [self.path] if self._handle is not None else []
        if everyone and self.folder.is_dir():
            files += [p for p in sorted(self.folder.glob("*.jsonl")) if p != self.path]
        sent, progress = 0, True
        while progress:  # a run created in one file may be named in another: go round until stuck
            progress = False
            for path in list(files):
                n, done = self._send_file(path, call)
                sent, progress = sent + n, progress or n > 0
                if done:
                    files.remove(path)
        if everyone and not any(self.folder.glob("*.jsonl")):
            self._clear()
        return sent

    def _send_file(self, path: Path, call: Callable[[str, dict], object]) -> tuple[int, bool]:
        """Send one journal; returns (calls sent, whether it is now empty)."""
        own = path == self.path
        with contextlib.ExitStack() as stack:
            if not own:  # another process's file: only once that process has let go of it
                handle = stack.enter_context(path.open("a"))
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return 0, True
            entries = _entries(path)
            sent = 0
            try:
                for entry in entries:
                    call(entry["op"], entry["args"])
                    sent += 1
                    if entry["op"] == "log_artifact":
                        shutil.rmtree(Path(entry["args"]["path"]).parent, ignore_errors=True)
            except Unresolved:
                pass
            finally:
                if sent:
                    self._keep(path, entries[sent:], own)
            return sent, sent == len(entries)

    def _keep(self, path: Path, entries: list[dict], own: bool) -> None:
        """Rewrite a journal to hold only the calls not sent yet (removed once empty)."""
        if entries:
            files.write_text(path, "".join(json.dumps(e) + "\n" for e in entries), "the MLflow journal")
        else:
            path.unlink()
        if own and self._handle is not None:
            self._handle.close()
            self._handle = self._open_own() if entries else None

    def waiting(self) -> int:
        """How many writes wait in the folder, this process's and others'."""
        if not self.folder.is_dir():
            return 0
        return sum(len(p.read_text().splitlines()) for p in self.folder.glob("*.jsonl"))

    def _clear(self) -> None:
        """Nothing is pending any more: the next outage is said again."""
        for said in self.folder.glob("said-*"):
            said.unlink(missing_ok=True)


def _entries(path: Path) -> list[dict]:
    """A journal's calls. Each is appended whole and synced before the next, so only the last line
    can be torn (its process killed as it wrote): that call was never made, and is dropped."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    entries = []
    for number, line in enumerate(lines):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise
    return entries
