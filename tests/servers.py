"""Real servers on 127.0.0.1 for tests: a free port, waiting for an address, an `mlflow server`
that can be killed and started again on the same store and port, a throw-away PostgreSQL."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, seconds: float) -> bytes:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args[:3]} exited with {process.returncode}")
        try:
            return urllib.request.urlopen(url, timeout=5).read()
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


class MlflowServer:
    """`mlflow server` over a SQLite store in ``folder``; ``kill()`` is a crash (SIGKILL to its
    process group), ``start()`` brings it back on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = Path(folder), free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.folder / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for_http(f"{self.uri}/health", self.process, 120)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            # its worker processes too, or the next start may find the port still taken
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.killpg(self.process.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)


class PostgresCluster:
    """A throw-away PostgreSQL cluster on 127.0.0.1, from Debian's postgresql package, with one
    database, ``optuna``; ``stop()`` is a crash of its server (immediate shutdown), ``start()``
    brings it back on the same port and data."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            import pytest

            pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
        self.bindir = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="pg-"))  # not under pytest's private tmp: postgres must reach it
        self.run_as = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self._run("initdb", "-D", self.root / "data", "-A", "trust", "-U", "postgres")
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "optuna")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/optuna"

    def _run(self, program: str, *args) -> None:
        subprocess.run([*self.run_as, self.bindir / program, *args], check=True, capture_output=True)

    def start(self) -> None:
        self._run(
            "pg_ctl",
            "-D",
            self.root / "data",
            "-l",
            self.root / "log",
            "-w",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", self.root / "data", "-m", "immediate", "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
