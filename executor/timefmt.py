"""RFC 3339 UTC timestamps with microseconds, the one time format of results, logs and
heartbeats: ``YYYY-MM-DDTHH:MM:SS.ffffffZ``.

The combined log stamps every chunk it reads, so the whole-second part is cached: only
the microseconds are formatted per call.
"""

from __future__ import annotations

import time

# (second, formatted prefix) in one tuple, so that threads never see a torn pair.
_cache: tuple[int, str] = (-1, "")


def rfc3339(epoch_seconds: float) -> str:
    """Format seconds since the epoch as ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC)."""
    global _cache
    second, fraction = divmod(round(epoch_seconds * 1_000_000), 1_000_000)
    cached_second, prefix = _cache
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cache = (second, prefix)
    return f"{prefix}.{fraction:06d}Z"


def rfc3339_or_none(epoch_seconds: float | None) -> str | None:
    """Like rfc3339(), passing None through (a task that never ran has null times)."""
    return None if epoch_seconds is None else rfc3339(epoch_seconds)


def now() -> str:
    """The current time as rfc3339()."""
    return rfc3339(time.time())
