"""IDX image files (MNIST format) and the restricted reader for the MNIST pickle."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

from project.data.errors import DataError

IDX_UBYTE = 0x08
# (magic number, dimensions) of the four files of an MNIST-format data set
IDX_FILES = {
    "train-images-idx3-ubyte.gz": 3,
    "train-labels-idx1-ubyte.gz": 1,
    "t10k-images-idx3-ubyte.gz": 3,
    "t10k-labels-idx1-ubyte.gz": 1,
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes, checking magic number and size."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file: {err}") from err
    if len(raw) < 4:
        raise DataError(f"{path}: file is {len(raw)} bytes, too short for an IDX header")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    expected_magic = (IDX_UBYTE << 8) | ndim
    if zero != 0 or dtype != IDX_UBYTE or dims != ndim:
        raise DataError(
            f"{path}: magic number 0x{struct.unpack('>I', raw[:4])[0]:08x}, "
            f"expected 0x{expected_magic:08x} (unsigned bytes, {ndim} dimension(s))"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: header truncated: {len(raw)} bytes, expected at least {header}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path}: size {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, IDX_UBYTE, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as stream:
        stream.write(header + array.tobytes())


def load_idx_set(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels, each checked against the other."""
    arrays = {name: read_idx(directory / name, ndim) for name, ndim in IDX_FILES.items()}
    x_train, y_train = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
    x_test, y_test = arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]
    for images, labels, name in ((x_train, y_train, "train"), (x_test, y_test, "t10k")):
        if len(images) != len(labels):
            raise DataError(
                f"{directory / f'{name}-labels-idx1-ubyte.gz'}: {len(labels)} labels, "
                f"expected {len(images)} to match {name}-images-idx3-ubyte.gz"
            )
        if labels.max(initial=0) > 9:
            raise DataError(f"{directory / f'{name}-labels-idx1-ubyte.gz'}: label {labels.max()}, expected 0..9")
    return x_train, y_train, x_test, y_test


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the numpy globals an array pickle needs; anything else is refused."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in an MNIST pickle")
        return super().find_class(module, name)


def _to_bytes(images: np.ndarray) -> np.ndarray:
    # the pickle stores pixels as byte / 256, so this conversion is exact
    return np.rint(np.asarray(images, dtype=np.float64) * 256).astype(np.uint8).reshape(-1, 28, 28)


def mnist_pickle_to_idx(pickle_path: Path, out_dir: Path) -> None:
    """Turn the 50k/10k/10k MNIST pickle back into the official 60k/10k IDX files."""
    try:
        with gzip.open(pickle_path, "rb") as stream:
            (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = _NumpyOnlyUnpickler(stream, encoding="latin1").load()
    except (pickle.UnpicklingError, ValueError, EOFError, OSError) as err:
        raise DataError(f"{pickle_path}: not a valid MNIST pickle: {err}") from err
    write_idx(out_dir / "train-images-idx3-ubyte.gz", np.concatenate([_to_bytes(x_tr), _to_bytes(x_va)]))
    write_idx(out_dir / "train-labels-idx1-ubyte.gz", np.concatenate([y_tr, y_va]).astype(np.uint8))
    write_idx(out_dir / "t10k-images-idx3-ubyte.gz", _to_bytes(x_te))
    write_idx(out_dir / "t10k-labels-idx1-ubyte.gz", np.asarray(y_te).astype(np.uint8))
