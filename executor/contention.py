"""Whether this machine's CPUs are contended: spinning for the next message only pays
when they are not; and `spin_poll`, the one place every process spins.

On an idle machine, a process that polls for a few hundred microseconds instead of
sleeping saves the wake-up, which is slow on a virtual machine. On a busy one the
spinner holds a CPU the other side is waiting for, and a chain of short exchanges gets
several times slower than without spinning. Linux's pressure stall information counts
the time runnable tasks waited for a CPU; its total, read every 100 ms, gives the share
of the last 100 ms (its own averages span 10 s and more: far too slow after a burst of
the run's own wide DAG). Until the first window has passed the answer is yes: 100 ms of
spinning on a busy machine costs little. Without that file, the load average stands in.
With EXECUTOR_FASTPATHS=off (executor.settings) no process spins at all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from executor.settings import fastpaths_on

CPUS = os.cpu_count() or 1
PSI_CPU = "/proc/pressure/cpu"
QUIET_SHARE = 0.05
"""Share of the last window in which some runnable task waited for a CPU, at most."""
_WINDOW_S = 0.1

SPIN_S = 200e-6
"""How long a process looks for its next message before it sleeps, while spinning pays:
waking a sleeping process costs CPU time on a virtual machine, and the next message of
a short exchange (a task's successor, a store request's answer) usually comes sooner."""

Ready = list[tuple[int, int]]
"""What poll(0) of a poll or epoll object returns: (fd, events) pairs."""


def spin_poll(poll: Callable[[float], Ready], seconds: float) -> Ready:
    """Call ``poll(0)`` until it reports something or ``seconds`` pass, without
    sleeping; its last answer. With EXECUTOR_FASTPATHS=off: nothing, at once (the
    caller goes to sleep)."""
    if not fastpaths_on():
        return []
    deadline = time.perf_counter() + seconds
    while not (ready := poll(0)) and time.perf_counter() < deadline:
        pass
    return ready


class Contention:
    """Answers `quiet()` from the last complete window of `_WINDOW_S` seconds."""

    def __init__(self, psi_path: str = PSI_CPU) -> None:
        self._psi_path = psi_path
        self._window_start: float | None = None
        self._stalled_us = 0
        self._quiet = True

    def quiet(self) -> bool:
        now = time.monotonic()
        start = self._window_start
        if start is None or now - start >= _WINDOW_S:
            self._window_start = now
            self._quiet = self._measure(None if start is None else now - start)
        return self._quiet

    def _measure(self, elapsed_s: float | None) -> bool:
        """The verdict for the window of `elapsed_s` that ends now (None: none yet)."""
        try:
            with open(self._psi_path, "rb") as psi:
                some = psi.readline()  # b"some avg10=1.23 avg60=4.56 avg300=7.89 total=123"
            stalled_us = int(some.rsplit(b"total=", 1)[1])
        except (OSError, IndexError, ValueError):
            return os.getloadavg()[0] < CPUS
        previous, self._stalled_us = self._stalled_us, stalled_us
        if elapsed_s is None or elapsed_s > 10 * _WINDOW_S:  # no recent window: start one
            return True
        return (stalled_us - previous) / 1e6 <= QUIET_SHARE * elapsed_s
