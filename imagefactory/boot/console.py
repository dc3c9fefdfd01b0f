"""The serial console log of a node: follow it for `EXECUTOR-STATUS` lines, show its tail.

The agent prints `EXECUTOR-STATUS node=<id> run=<id> state=<state>` once when it starts
and once when it ends (docs/core-services.md); the image sends the agent's stdout to the
console as well as the journal. Kernel messages may be interleaved, so a status is found
anywhere in a line.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from pathlib import Path

STATUS_RE = re.compile(r"EXECUTOR-STATUS node=(?P<node>\S+) run=(?P<run>\S+) state=(?P<state>\w+)")
RUNNING_STATES = frozenset({"starting", "running", "reporting"})
"""States printed while the agent still works; any other state is final."""


@dataclass(frozen=True)
class Status:
    node: str
    run: str
    state: str

    @property
    def final(self) -> bool:
        return self.state not in RUNNING_STATES


def parse_status(line: str) -> Status | None:
    match = STATUS_RE.search(line)
    if match is None:
        return None
    return Status(match["node"], match["run"], match["state"])


class ConsoleFollower:
    """Reads a growing console log incrementally, keeping the statuses seen so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.statuses: list[Status] = []
        self._offset = 0
        self._partial = b""

    def poll(self) -> list[Status]:
        """Read what was appended since the last call; return the new statuses."""
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        found = [s for raw in lines if (s := parse_status(raw.decode("utf-8", "replace")))]
        self.statuses.extend(found)
        return found

    @property
    def last(self) -> Status | None:
        return self.statuses[-1] if self.statuses else None


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last lines of a console log, without carriage returns and escape sequences."""
    try:
        with path.open("rb") as f:
            last = deque(f, maxlen=lines)
    except FileNotFoundError:
        return []
    ansi = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    return [ansi.sub("", raw.decode("utf-8", "replace")).rstrip("\r\n") for raw in last]
