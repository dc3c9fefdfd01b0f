"""scripts/build_rootfs.py: its bad inputs (a real build is minutes of mmdebstrap; the
benchmarks and the nightly aarch64 bake build roots the same way, through build_rootfs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
