"""Files written whole or not at all, and a full disk said in one line.

Every file the project writes goes to a hidden temporary name in its own folder and is renamed
into place once complete (``os.replace``, atomic on one filesystem); a folder of several files is
built under a temporary name and renamed last. A reader, or the next command after a ``kill -9``
or a full disk, never finds a half-written file under its final name. What cannot be written
(no space, a read-only or vanished folder) raises ``WriteFailed``, which names the path and what it
was to hold; the commands say it in one line.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TypeGuard

# what a folder that cannot take a file raises; any other OSError is a bug and keeps its traceback
UNWRITABLE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG, errno.ENOENT}


class WriteFailed(OSError):
    """``what`` could not be written to ``path``: the disk is full, or the folder read-only or gone."""

    def __init__(self, path: Path, what: str, err: OSError) -> None:
        super().__init__(err.errno, f"cannot write {what} to {path}: {err.strerror or err}")
        self.path, self.what = Path(path), what

    def __str__(self) -> str:
        return str(self.strerror)


def unwritable(err: BaseException) -> TypeGuard[OSError]:
    """Whether ``err`` says a file could not be written for want of space or permission."""
    return isinstance(err, OSError) and not isinstance(err, WriteFailed) and err.errno in UNWRITABLE


def _temporary(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}")


@contextlib.contextmanager
def atomic_path(path: Path, what: str) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; renamed to ``path`` when the block
    ends, removed if it raises."""
    path = Path(path)
    tmp = _temporary(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb") as handle:  # on disk before it takes the final name
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if unwritable(err):
            raise WriteFailed(path, what, err) from None
        raise


@contextlib.contextmanager
def atomic_folder(folder: Path, what: str) -> Iterator[Path]:
    """A new temporary folder beside ``folder`` for the block to fill; it replaces ``folder`` when
    the block ends (the old one is moved aside first, then removed), and is removed if it raises."""
    folder = Path(folder)
    tmp = _temporary(folder, "tmp")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if folder.exists():
            old = _temporary(folder, "old")
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if unwritable(err):
            raise WriteFailed(folder, what, err) from None
        raise


def write_bytes(path: Path, data: bytes, what: str) -> Path:
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path, text: str, what: str) -> Path:
    return write_bytes(path, text.encode(), what)


def write_json(path: Path, value: object, what: str) -> Path:
    return write_text(path, json.dumps(value, indent=2), what)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torch_bytes(value: object) -> bytes:
    """``torch.save`` of ``value`` in memory: written to disk by ``write_bytes`` it raises ``OSError``
    on a full disk, where torch's own file writer raises a ``RuntimeError``."""
    import torch

    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()
