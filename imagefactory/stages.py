"""Progress of long work as named stages, each with its elapsed time, and `follow()`,
which runs a long command while streaming and logging its output.

    ==> base: building Debian bookworm arm64 root filesystem
        ... (detail lines)
    ==> base: done in 81.2s
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from imagefactory.run import Argv, CommandError, spawn

TAIL_LINES = 25
"""Lines of a failed command's output shown in the error."""


class Stages:
    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.times: dict[str, float] = {}
        """Seconds per finished stage, in the order they ran (stages may repeat: summed)."""
        self._running: tuple[str, float] | None = None

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def detail(self, text: str) -> None:
        self.say(f"    {text}")

    @contextmanager
    def stage(self, name: str, what: str = "") -> Iterator[None]:
        self.begin(name, what)
        try:
            yield
        finally:
            self.end()

    def begin(self, name: str, what: str = "") -> None:
        """Start a stage, ending the current one (for stages read off a command's output)."""
        self.end()
        self.say(f"==> {name}: {what}" if what else f"==> {name}")
        self._running = (name, time.monotonic())

    def end(self) -> None:
        if self._running is None:
            return
        name, started = self._running
        self._running = None
        elapsed = time.monotonic() - started
        self.times[name] = round(self.times.get(name, 0.0) + elapsed, 1)
        self.say(f"==> {name}: done in {elapsed:.1f}s")


TOOL_GRACE_S = 30.0
"""How long an interrupted `follow` command (Packer, mmdebstrap) may clean up after SIGTERM."""
TOOL_KILL_WAIT_S = 10.0
"""Then how long SIGKILL may take."""
BAKE_STOP_S = TOOL_GRACE_S + TOOL_KILL_WAIT_S + 20.0
"""How long whoever interrupts a bake should let it stop before SIGKILL (the builder's
`--grace-seconds`): the bake waits up to TOOL_GRACE_S + TOOL_KILL_WAIT_S for its tool,
then cleans up. Killed sooner, it leaves the tool to stop on its own."""


def follow(
    argv: Argv,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    grace_s: float = TOOL_GRACE_S,
) -> None:
    """Run a long command, writing all its output to `log_path` and handing each line to
    `on_line`. On failure raise `CommandError` with the tail of the output. If we are
    interrupted (Ctrl-C) or fail, the command's process group gets SIGTERM, then SIGKILL
    after `grace_s`, so no VM or build outlives us; if we are killed outright, the command
    gets SIGTERM (Packer then stops its VM)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = spawn(argv, env=env, cwd=cwd, die_with_parent=True)
    assert proc.stdout is not None
    try:
        with proc.stdout, log_path.open("a", encoding="utf-8") as log:
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                tail.append(line)
                if on_line:
                    on_line(line)
        returncode = proc.wait()
    except BaseException:
        terminate(proc, grace_s)
        raise
    if returncode != 0:
        raise CommandError([str(a) for a in argv], returncode, "\n".join(tail), "")


def terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, TOOL_KILL_WAIT_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
