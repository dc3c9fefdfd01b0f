"""Whether this machine's CPUs are contended: spinning for the next message only pays
when they are not.

On an idle machine, a process that polls for a few hundred microseconds instead of
sleeping saves the 50-100 us a wake-up costs on a virtual machine. On a busy one the
spinner holds a CPU the other side is waiting for, and the chain gap gets several times
worse (measured: 79 us idle with spinning, 542 us with spinning while two QEMU guests
booted, 106 us without). Linux's pressure stall information counts the time runnable
tasks waited for a CPU; its total, read once a second, gives the share of the last second
(its own averages span 10 s and more: too slow after a burst of our own wide DAG). Without
it, the load average stands in.
"""

from __future__ import annotations

import os
import time

PSI_CPU = "/proc/pressure/cpu"
QUIET_SHARE = 0.05
"""Share of the last second in which some runnable task waited for a CPU, at most."""
_RECHECK_S = 1.0


class Contention:
    """Answers `quiet()` from a reading at most `_RECHECK_S` old (one read a second)."""

    def __init__(self, psi_path: str = PSI_CPU) -> None:
        self._psi_path = psi_path
        self._cpus = os.cpu_count() or 1
        self._checked = -_RECHECK_S
        self._stalled_us: int | None = None
        self._quiet = False

    def quiet(self) -> bool:
        now = time.monotonic()
        elapsed = now - self._checked
        if elapsed >= _RECHECK_S:
            self._checked = now
            self._quiet = self._measure(elapsed)
        return self._quiet

    def _measure(self, elapsed_s: float) -> bool:
        try:
            with open(self._psi_path, "rb") as psi:
                some = psi.readline()  # b"some avg10=1.23 avg60=4.56 avg300=7.89 total=123"
            fields = dict(field.split(b"=") for field in some.split()[1:])
            stalled_us, previous = int(fields[b"total"]), self._stalled_us
            self._stalled_us = stalled_us
            if previous is None or elapsed_s > 10 * _RECHECK_S:  # no recent reading
                return float(fields[b"avg10"]) <= 100 * QUIET_SHARE
            return (stalled_us - previous) / 1e6 <= QUIET_SHARE * elapsed_s
        except (OSError, KeyError, ValueError):
            return os.getloadavg()[0] < self._cpus
