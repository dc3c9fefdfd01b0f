"""Nothing a run starts outlives it.

A task may start processes that leave its worker's process group: a daemon (`setsid` and
a double fork) is re-parented to init and lives on after the run. While a run goes, the
manager is a child subreaper (PR_SET_CHILD_SUBREAPER), so such orphans become its
children instead; when the run ends, every child the manager did not have before the run
(except the long-lived helpers of multiprocessing, which later runs reuse) is killed with
its process group and reaped. The process groups of the workers (killed when a worker
ends) catch the rest.
"""

from __future__ import annotations

import ctypes
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from types import TracebackType

_PR_SET_CHILD_SUBREAPER, _PR_GET_CHILD_SUBREAPER = 36, 37
_ROUNDS = 20
"""Killing a leftover re-parents its children to us: look again, up to this many times."""
_ROUND_PAUSE_S = 0.05


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid`, read from /proc."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: the fields follow the last ')'.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.add(int(stat.parent.name))
    return found


def _helpers() -> set[int]:
    """multiprocessing's forkserver and resource tracker: started by a run, kept for the
    next; multiprocessing itself reaps them."""
    pids = {
        getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None),
        getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
    }
    return {pid for pid in pids if isinstance(pid, int)}


class _Prctl:
    def __init__(self) -> None:
        self._call: Callable[..., int] | None
        try:
            self._call = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):  # pragma: no cover - not Linux/glibc
            self._call = None

    def subreaper(self) -> bool:
        value = ctypes.c_int(0)
        if self._call is None or self._call(_PR_GET_CHILD_SUBREAPER, ctypes.byref(value)) != 0:
            return False
        return bool(value.value)

    def set_subreaper(self, on: bool) -> bool:
        return self._call is not None and self._call(_PR_SET_CHILD_SUBREAPER, int(on)) == 0


class Leftovers:
    """`with Leftovers(log):` around a run; `log` hears of each process it had to kill."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self._log = log
        self._prctl = _Prctl()
        self._before: set[int] = set()
        self._was_subreaper = False

    def __enter__(self) -> Leftovers:
        self._before = children(os.getpid())
        self._was_subreaper = self._prctl.subreaper()
        self._prctl.set_subreaper(True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.kill()
        finally:
            if not self._was_subreaper:
                self._prctl.set_subreaper(False)

    def kill(self) -> list[int]:
        """Kill and reap every child the run left; returns their pids."""
        killed: list[int] = []
        for _ in range(_ROUNDS):
            left = children(os.getpid()) - self._before - _helpers()
            if not left:
                break
            for pid in sorted(left):
                _kill_with_group(pid)
                killed.append(pid)
            for pid in left:
                with suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            time.sleep(_ROUND_PAUSE_S)  # its own orphans arrive after it died
        if killed:
            self._log(f"killed {len(killed)} process(es) the run left behind: {killed}")
        return killed


def _kill_with_group(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        group = os.getpgid(pid)
        if group != os.getpgrp():  # never our own group
            os.killpg(group, signal.SIGKILL)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
