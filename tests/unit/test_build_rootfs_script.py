"""scripts/build_rootfs.py: its bad inputs (a real build is minutes of mmdebstrap; the
benchmarks and the nightly aarch64 bake build roots the same way, through build_rootfs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts/build_rootfs.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def test_an_existing_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("mine\n")
    done = _run("aarch64-linux", str(tmp_path))
    assert done.returncode == 2
    assert done.stderr == f"Error: {tmp_path}: File exists\n"
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_an_unknown_target_is_a_usage_error(tmp_path: Path) -> None:
    done = _run("riscv64-linux", str(tmp_path / "new"))
    assert done.returncode == 2
    assert "invalid choice: 'riscv64-linux'" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_user_who_is_not_root_is_told_before_anything_is_made(tmp_path: Path) -> None:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, str(SCRIPT), "aarch64-linux", str(tmp_path / "new")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "Error: run it as root: mmdebstrap builds the root in its root mode\n"
    assert not (tmp_path / "new").exists()
