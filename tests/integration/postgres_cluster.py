"""A private PostgreSQL cluster for the integration tests: in a temporary directory, on
loopback, stopped (immediate) and removed afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.integration.services_harness import free_port


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: use the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _run(argv: list[str], timeout_s: float) -> None:
    done = subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, f"{argv[0]} failed: {done.stdout}{done.stderr}"


@contextmanager
def running_postgres() -> Iterator[str]:
    """The SQLAlchemy URL of a fresh cluster (skips the test if PostgreSQL is missing)."""
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup-host.sh installs it)")
    # Not under pytest's tmp_path: the postgres user must be able to reach the directory.
    home = Path(tempfile.mkdtemp(prefix="fleetbake-pg-"))
    data = home / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    ctl = [str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-t", "120"]
    try:
        _run([str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "fleet"], 300)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {home}"
        _run([*ctl, "-o", options, "-l", str(home / "log"), "start"], 180)
        yield f"postgresql+psycopg://fleet@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_postgres([*ctl, "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
