"""Output paths that are not regular files: devices and pipes are written, not replaced.

Each test makes its own character device (the same device as /dev/null, made with mknod
in a temporary directory), so a regression replaces that node and never the machine's
/dev/null.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.executor_pipelines import make_pipeline, run_pipeline, task

EXECUTOR = [sys.executable, "-m", "executor"]
HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"


@pytest.fixture
def null_device(tmp_path: Path) -> Path:
    """A private node of the null device (major 1, minor 3); needs root."""
    path = tmp_path / "null"
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root (CAP_MKNOD)")
    return path


def still_the_device(path: Path, before: os.stat_result) -> bool:
    after = path.lstat()
    return stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def executor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXECUTOR, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_run_writes_results_and_log_into_a_device(null_device: Path) -> None:
    before = null_device.lstat()
    done = executor("run", str(HELLO), "--results", str(null_device), "--log", str(null_device))
    assert done.returncode == 0, done.stderr
    assert still_the_device(null_device, before)
    assert [p.name for p in null_device.parent.iterdir()] == ["null"]  # no temporaries


def test_pack_writes_into_a_device(null_device: Path) -> None:
    before = null_device.lstat()
    done = executor("pack", str(HELLO), "-o", str(null_device))
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) == 64  # the sha256 of what was written
    assert still_the_device(null_device, before)


def test_run_writes_results_into_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "results"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    done = executor("run", str(HELLO), "--results", str(fifo), "--log", str(tmp_path / "log"))
    reader.join(60)
    assert done.returncode == 0, done.stderr
    assert json.loads(received[0])["status"] == "succeeded"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


def test_results_to_a_directory_is_one_error_line(tmp_path: Path) -> None:
    target = tmp_path / "a-directory"
    target.mkdir()
    done = executor("run", str(HELLO), "--results", str(target), "--log", str(tmp_path / "log"))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and str(target) in errors[0], done.stderr
    assert target.is_dir() and list(target.iterdir()) == []


def test_results_are_strict_utf8_json_whatever_a_task_returns(tmp_path: Path) -> None:
    pipeline = make_pipeline(
        tmp_path / "p", [task("odd", "odd_strings"), task("nan", "not_a_number")]
    )
    results, _ = run_pipeline(pipeline, tmp_path)
    assert results["tasks"]["odd"]["result"] == {"lone \ufffd": "a\ufffdb", "pair": "\U0001f600"}
    assert results["tasks"]["nan"]["status"] == "failed"  # NaN is not JSON
    assert "not JSON-serializable" in results["tasks"]["nan"]["error"]["message"]
    text = (tmp_path / "results.json").read_bytes().decode("utf-8", "strict")
    assert "\\ud800" not in text and "\\udfff" not in text
