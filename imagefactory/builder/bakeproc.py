"""One bake as a child process: `python -m imagefactory bake ... --json`, in its own process
group, with its stderr (the stage lines) read by a thread.

The child is the same `bake` a user runs, so every format in the baker registry works,
and a cancel takes the bake's own interrupt path: SIGINT (its Ctrl-C: it stops its
Packer, QEMU or container build and cleans up), then SIGKILL to the group after a grace
period. If the builder dies, the child gets SIGTERM (parent-death signal), which
`python -m imagefactory` treats as Ctrl-C too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefactory.run import spawn

STAGE_LINE = re.compile(r"==> (?P<name>[A-Za-z0-9][A-Za-z0-9_. -]{0,63}): (?P<rest>.*)")
STAGE_DONE = re.compile(r"done in (?P<seconds>[0-9]+(?:\.[0-9]+)?)s")
MAX_LINE = 16384


def bake_argv(target: str, image_format: str, pipeline: Path, output: Path) -> list[str]:
    return [
        sys.executable, "-m", "imagefactory", "bake", "--target", target,
        "--format", image_format, "--pipeline", str(pipeline), "--output", str(output), "--json",
    ]  # fmt: skip


@dataclass
class Progress:
    """What the bake has said so far: new log lines, the stage in progress, stage times."""

    stage: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)

    def see(self, line: str) -> None:
        self.pending.append(line[:MAX_LINE])
        match = STAGE_LINE.fullmatch(line)
        if match is None:
            return
        done = STAGE_DONE.fullmatch(match["rest"])
        if done is not None:
            self.stages[match["name"]] = float(done["seconds"])
            self.stage = None
        else:
            self.stage = match["name"]


class BakeProcess:
    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.progress = Progress()
        self._lock = threading.Lock()
        self._log = log_path.open("a", encoding="utf-8")
        self._stdout = log_path.with_suffix(".json")
        with self._stdout.open("wb") as out:
            self.proc: subprocess.Popen[bytes] = spawn(
                argv,
                stdout=out.fileno(),
                stderr=subprocess.PIPE,
                die_with_parent=True,
                interruptible=True,  # a cancel is its Ctrl-C
            )
        self._reader = threading.Thread(target=self._read, name="bake-stderr", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for raw in self.proc.stderr:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._log.write(line + "\n")
                self._log.flush()
                with self._lock:
                    self.progress.see(line)

    def take(self) -> tuple[str | None, dict[str, float], list[str]]:
        """(stage, stage times, the log lines not taken before)."""
        with self._lock:
            lines, self.progress.pending = self.progress.pending, []
            return self.progress.stage, dict(self.progress.stages), lines

    def stage_times(self) -> dict[str, float]:
        """The stage times so far, leaving the log lines for the next heartbeat."""
        with self._lock:
            return dict(self.progress.stages)

    def give_back(self, lines: list[str]) -> None:
        """Lines that could not be sent: they go first next time."""
        with self._lock:
            self.progress.pending[:0] = lines

    def wait(self, timeout_s: float) -> int | None:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(timeout=30)
        return code

    def interrupt(
        self, grace_s: float, meanwhile: Callable[[], object] = lambda: None, every_s: float = 5.0
    ) -> int:
        """The bake's Ctrl-C, then SIGKILL to its group after `grace_s`; `meanwhile` is
        called every `every_s` while it stops (the builder renews its lease)."""
        for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while (left := deadline - time.monotonic()) > 0:
                code = self.wait(min(every_s, left))
                if code is not None:
                    return code
                meanwhile()
        return self.proc.wait()

    def summary(self) -> dict[str, Any]:
        """The `--json` summary the bake printed (`{"images": [...]}`)."""
        value = json.loads(self._stdout.read_text(encoding="utf-8"))
        assert isinstance(value, dict)
        return value

    def close(self) -> None:
        self._log.close()
