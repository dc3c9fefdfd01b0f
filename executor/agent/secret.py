"""The node token leaves the environment before the agent starts anything.

`/proc/PID/environ` shows the environment a process was executed with: taking
EXECUTOR_TOKEN out of `os.environ` changes neither that nor what children inherit from
the exec. So `executor agent` executes itself once more, without the variable; the token
waits in an anonymous file (memfd) the new program inherits, named by EXECUTOR_TOKEN_FD,
which the agent reads and closes at once. The agent then makes itself non-dumpable, so
that a process of the same user (a task) can neither read its memory or environment
through /proc nor trace it. Tasks run in workers forked from a fresh forkserver, never
from the agent, so no worker's memory holds the token either (executor/agent/runner.py).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

TOKEN = "EXECUTOR_TOKEN"
TOKEN_FD = "EXECUTOR_TOKEN_FD"
_PR_SET_DUMPABLE = 4


def reexec_without_token(environ: MutableMapping[str, str] = os.environ) -> None:
    """Execute this program again without EXECUTOR_TOKEN in its environment (the token in
    an inherited memfd); returns only when there is no token to move."""
    token = environ.get(TOKEN)
    if not token:
        return
    try:
        fd = os.memfd_create("executor-token", 0)  # no MFD_CLOEXEC: the new program needs it
        os.write(fd, token.encode())
        env = {k: v for k, v in environ.items() if k != TOKEN}
        env[TOKEN_FD] = str(fd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as exc:  # an old kernel, a vanished interpreter: run, but say so
        print(
            f"executor agent: warning: EXECUTOR_TOKEN stays in the environment ({exc})",
            file=sys.stderr,
        )


def take_token(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """The token that `reexec_without_token` handed over, read once; the descriptor is
    closed and EXECUTOR_TOKEN_FD leaves the environment, so no child sees either."""
    raw = environ.pop(TOKEN_FD, None)
    if raw is None:
        return None
    fd = int(raw)
    try:
        return os.pread(fd, 4096, 0).decode().strip() or None
    finally:
        os.close(fd)


def make_undumpable() -> None:
    """No /proc access or ptrace by unprivileged processes of the same user."""
    import ctypes  # here: this module is imported before the re-execution, ctypes after

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
        pass
