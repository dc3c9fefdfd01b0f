"""imagefactory.run's spawn and run with real processes: a VM started for a command that
dies must not outlive it (the parent-death signal), unless it is meant to; a command that is
stopped with SIGINT gets it even from a parent that ignores SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import process_alive

PARENT = """
import sys, time
from imagefactory.run import run, spawn
pidfile, launcher, die_with_parent = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
argv = ["sh", "-c", f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile} && exec sleep 300"]
if launcher == "spawn":
    spawn(argv, stdout=None, die_with_parent=die_with_parent)
    time.sleep(300)
else:
    run(argv, die_with_parent=die_with_parent)
"""


def _child_of_killed_parent(tmp_path: Path, launcher: str, die_with_parent: bool) -> int:
    """Start a parent that starts `sleep` through `launcher`, SIGKILL the parent once the
    sleep runs; return the sleep's pid."""
    pidfile = tmp_path / "child.pid"
    argv = [sys.executable, "-c", PARENT, str(pidfile), launcher, "1" if die_with_parent else "0"]
    with subprocess.Popen(argv) as parent:
        deadline = time.monotonic() + 60
        while not pidfile.exists():
            assert parent.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        parent.kill()
    return int(pidfile.read_text())


@pytest.mark.parametrize("launcher", ["spawn", "run"])
@pytest.mark.parametrize("die_with_parent", [True, False])
def test_a_started_process_dies_with_its_killed_parent_only_when_asked(
    tmp_path: Path, launcher: str, die_with_parent: bool
) -> None:
    child = _child_of_killed_parent(tmp_path, launcher, die_with_parent)
    try:
        deadline = time.monotonic() + (10 if die_with_parent else 2)
        while process_alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_alive(child) is not die_with_parent
    finally:
        if process_alive(child):
            os.kill(child, signal.SIGKILL)


INTERRUPTED = """
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a job a shell starts with `&`
from imagefactory.run import spawn
child = spawn(["sleep", "300"], stdout=None, interruptible=sys.argv[1] == "1")
child.send_signal(signal.SIGINT)
try:
    print(child.wait(timeout=float(sys.argv[2])))
except subprocess.TimeoutExpired:
    child.kill()
    child.wait()
    print("still running")
"""


@pytest.mark.parametrize("interruptible", [True, False])
def test_sigint_stops_a_spawned_process_from_an_ignoring_parent_only_when_asked(
    interruptible: bool,
) -> None:
    argv = [
        sys.executable,
        "-c",
        INTERRUPTED,
        "1" if interruptible else "0",
        "10" if interruptible else "1",
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == (str(-signal.SIGINT) if interruptible else "still running")
