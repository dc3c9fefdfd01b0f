"""Every subprocess the image factory starts goes through this module.

`run()` waits for a command, `spawn()` starts one in the background. Both log the
command line in debug mode, and a failure becomes a `CommandError` that holds the
command, its exit code and the tail of its output.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("imagefactory.run")

Argv = Sequence[str | os.PathLike[str]]
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


TAIL_LINES = 5
"""How many of a failed command's last output lines its error shows."""
_TAIL_WIDTH = 200


@dataclass
class CommandError(Exception):
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        """One line, for logs and for steps that wrap the failure in their own message."""
        tail = self.tail()
        return self.headline() + (("; " + " | ".join(tail)) if tail else "")

    def headline(self) -> str:
        """`command failed with exit code 3: mkfs.fat -F 16 ...` (or `killed by SIGKILL`)."""
        if self.returncode < 0:
            try:
                how = f"killed by {signal.Signals(-self.returncode).name}"
            except ValueError:
                how = f"killed by signal {-self.returncode}"
        else:
            how = f"failed with exit code {self.returncode}"
        return f"command {how}: {shlex.join(self.argv)}"

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last non-blank lines of its stderr, or of its stdout if stderr has none."""
        text = self.stderr if self.stderr.strip() else self.stdout
        kept = [line.rstrip() for line in text.splitlines() if line.strip()][-lines:]
        return [
            line if len(line) <= _TAIL_WIDTH else line[: _TAIL_WIDTH - 3] + "..." for line in kept
        ]

    def message(self) -> str:
        """What a command line tool prints after `Error: `: the headline, then the tail of
        the command's output, one indented line each."""
        return "\n".join([self.headline(), *(f"  {line}" for line in self.tail())])


def _argv(argv: Argv) -> list[str]:
    return [os.fspath(a) for a in argv]


def _env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    if not extra:
        return None
    return {**os.environ, **extra}


def run(
    argv: Argv,
    *,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float | None = None,
    die_with_parent: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, capturing its output as text. `die_with_parent`, for
    commands that may run for minutes: as in `spawn`, a killed caller takes it along."""
    args = _argv(argv)
    log.debug("run: %s", shlex.join(args))
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=_env(env),
        cwd=cwd,
        input=input,
        timeout=timeout,
        check=False,
        preexec_fn=_child_setup(os.getpid() if die_with_parent else None, interruptible=False),
    )
    if check and proc.returncode != 0:
        log.debug("failed (%d): %s", proc.returncode, shlex.join(args))
        raise CommandError(args, proc.returncode, proc.stdout, proc.stderr)
    return proc


def spawn(
    argv: Argv,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | None = subprocess.PIPE,
    stderr: int | None = subprocess.STDOUT,
    die_with_parent: bool = False,
    interruptible: bool = False,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start a command in its own process group, so that it can be killed as a whole.

    `die_with_parent`: the command gets SIGTERM when this process dies, even by SIGKILL
    (Linux's parent-death signal), so that no VM outlives the `imagefactory boot` that
    was to clean it up.

    `interruptible`: SIGINT gets its default action back in the command, for callers that
    stop it with SIGINT. A process started in the background by a shell inherits SIGINT
    ignored, and an exec keeps that: Python would then never raise KeyboardInterrupt.
    """
    args = _argv(argv)
    log.debug("spawn: %s", shlex.join(args))
    return subprocess.Popen(
        args,
        env=_env(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        preexec_fn=_child_setup(os.getpid() if die_with_parent else None, interruptible),
        pass_fds=pass_fds,
    )


def _child_setup(parent: int | None, interruptible: bool) -> Callable[[], None] | None:
    """What the child runs between fork and exec; None when there is nothing to do."""
    if parent is None and not interruptible:
        return None
    prctl = ctypes.CDLL(None).prctl  # loaded here: the child only calls it

    def setup() -> None:
        if interruptible:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if parent is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:
                os._exit(1)  # the parent died before the signal was armed

    return setup


def which(program: str) -> Path | None:
    """The full path of a program on PATH, or None."""
    from shutil import which as _which

    found = _which(program)
    return Path(found) if found else None
