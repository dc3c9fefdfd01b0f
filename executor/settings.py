"""EXECUTOR_* environment variables shared by ``executor run`` and ``executor agent``.

Each reader takes the environment as a mapping (tests pass a dict) and raises
SettingsError, whose str() is one line naming the variable and the problem.
`fastpaths_on()` is the one process-wide reading of EXECUTOR_FASTPATHS.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/executor")
USER_STATE_DIR = Path("~/.local/state/executor")

# Ids end up in file names and URL paths: keep them to a safe alphabet, and to what the
# core services accept (imagefactory/server/schemas.py ID_PATTERN).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class SettingsError(ValueError):
    """An invalid EXECUTOR_* value; str() is one line."""


@dataclass(frozen=True)
class RunSettings:
    """The identity and resources of one run, resolved from the environment."""

    node_id: str
    """EXECUTOR_NODE_ID, default: the host name."""
    run_id: str
    """EXECUTOR_RUN_ID, default: a new UUID."""
    workers: int
    """EXECUTOR_WORKERS, default: the CPU count."""
    state_dir: Path
    """EXECUTOR_STATE_DIR, default /var/lib/executor, else ~/.local/state/executor."""


def run_settings(env: Mapping[str, str] = os.environ) -> RunSettings:
    """Read all four run settings; the first invalid one raises SettingsError."""
    return RunSettings(
        node_id=node_id(env),
        run_id=run_id(env),
        workers=workers(env),
        state_dir=state_dir(env),
    )


def node_id(env: Mapping[str, str] = os.environ) -> str:
    """EXECUTOR_NODE_ID, or the host name."""
    value = env.get("EXECUTOR_NODE_ID") or socket.gethostname()
    return check_id("EXECUTOR_NODE_ID", value)


def run_id(env: Mapping[str, str] = os.environ) -> str:
    """EXECUTOR_RUN_ID, or a new UUID."""
    value = env.get("EXECUTOR_RUN_ID") or str(uuid.uuid4())
    return check_id("EXECUTOR_RUN_ID", value)


def workers(env: Mapping[str, str] = os.environ) -> int:
    """EXECUTOR_WORKERS, or the number of CPUs."""
    raw = env.get("EXECUTOR_WORKERS")
    if not raw:
        return os.cpu_count() or 1
    return check_count("EXECUTOR_WORKERS", raw)


def state_dir(env: Mapping[str, str] = os.environ) -> Path:
    """EXECUTOR_STATE_DIR (created if missing), or the first writable default."""
    raw = env.get("EXECUTOR_STATE_DIR")
    if raw:
        path = Path(raw).expanduser()
        if not _writable_dir(path):
            raise SettingsError(f"EXECUTOR_STATE_DIR: {path} is not a writable directory")
        return path
    for path in (SYSTEM_STATE_DIR, USER_STATE_DIR):
        try:
            path = path.expanduser()
        except RuntimeError:  # no home directory to expand
            continue
        if _writable_dir(path):
            return path
    raise SettingsError(f"no writable state directory ({SYSTEM_STATE_DIR}, {USER_STATE_DIR})")


def fastpaths(env: Mapping[str, str] = os.environ) -> bool:
    """EXECUTOR_FASTPATHS: ``on`` (also when unset or empty) or ``off``.

    Off, the run's services use none of their shared-memory fast paths (counters, the
    wait board, recycled memfds) and no process spins for its next message.
    """
    raw = env.get("EXECUTOR_FASTPATHS") or "on"
    if raw not in ("on", "off"):
        raise SettingsError(f"EXECUTOR_FASTPATHS: {raw!r} is neither 'on' nor 'off'")
    return raw == "on"


@functools.cache
def fastpaths_on() -> bool:
    """`fastpaths()` of this process's environment, read at the first call.

    A forked worker inherits the answer; the services process and a forkserver are
    fresh interpreters that read the environment they inherited. RunServices.start()
    asks first, so an invalid value fails the run at its start.
    """
    return fastpaths(os.environ)


def check_id(name: str, value: str) -> str:
    """Accept ``value`` as an id or raise SettingsError naming ``name``."""
    if not _ID.fullmatch(value):
        raise SettingsError(
            f"{name}: {value!r} is not 1-128 characters of [A-Za-z0-9_.-] "
            "starting with a letter or digit"
        )
    return value


def check_seconds(name: str, raw: str) -> float:
    """Parse a duration (a finite number > 0) or raise SettingsError naming ``name``."""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise SettingsError(f"{name}: {raw!r} is not a positive number of seconds")
    return value


def check_count(name: str, raw: str) -> int:
    """Parse a count (an integer >= 1) or raise SettingsError naming ``name``."""
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise SettingsError(f"{name}: {raw!r} is not an integer >= 1")
    return count


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)
