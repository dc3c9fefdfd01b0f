"""Process checks shared by unit and integration tests."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (one that nobody may ever reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between open and read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def signal_when(
    argv: Sequence[str], sig: int, started: Path, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Start argv, send it `sig` once the file `started` exists; (exit code, stderr)."""
    with subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=default_sigint,
    ) as process:  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not started.exists():
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            process.send_signal(sig)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return process.returncode, stderr.decode()


def default_sigint() -> None:
    """A child's preexec_fn: SIGINT back to its default. A test run started in the
    background by a non-interactive shell (`cmd &`) inherits it ignored, and a Python child
    then never installs its KeyboardInterrupt handler: Ctrl-C tests would time out."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
