"""The values a `Store` read or wrote, kept while their keys are known to be unchanged.

The services process keeps a table of version counters in shared memory, one per hash
bucket of keys, and bumps a key's bucket on every change before it answers. An entry
holds the range of its bucket's versions for which it is the key's value: the version a
read was answered at, or, for this process's own write, the version before it was sent
and the one after the services applied it (the write is the latest until another change
to the bucket). Small values are kept as their pickle, big ones as their memfd, kept
open. The services process recycles a memfd (executor/services/memfd_values.py) only after it
replaced or deleted its value, which bumps the key's bucket first; but that can happen
between a reader's version check and its copy, which the memfd's generation catches.
The cache uses none of the fast paths EXECUTOR_FASTPATHS turns off, and stays on.
"""

from __future__ import annotations

from executor.services.wire import Blob

Cached = bytes | Blob | None
"""An inline pickle, a memfd value (owned by the cache), or None: the key is absent."""

MAX_BYTES = 16 << 20
"""The cache is dropped as a whole when its values pass this size."""
_ENTRY_OVERHEAD = 100  # bytes counted per entry besides the key and the value


class Miss:
    """The answer of `ValueCache.lookup` when the cache cannot answer."""


MISS = Miss()


class ValueCache:
    def __init__(self) -> None:
        self._entries: dict[str, tuple[int, int, Cached]] = {}
        self._bytes = 0

    def lookup(self, key: str, version: int) -> Cached | Miss:
        """The cached value of `key` if `version` (its bucket's, now) is in its range."""
        hit = self._entries.get(key)
        if hit is None or not hit[0] <= version <= hit[1]:
            return MISS
        return hit[2]

    def remember(self, key: str, low: int, high: int, value: Cached) -> None:
        """Keep `value` for `key` while its bucket's version is from `low` to `high`."""
        self.forget(key)
        size = _size(key, value)
        if self._bytes + size > MAX_BYTES:
            self.clear()
        self._entries[key] = (low, high, value)
        self._bytes += size

    def forget(self, key: str) -> None:
        hit = self._entries.pop(key, None)
        if hit is not None:
            self._bytes -= _size(key, hit[2])
            if isinstance(hit[2], Blob):
                hit[2].close()

    def clear(self) -> None:
        for _, _, value in self._entries.values():
            if isinstance(value, Blob):
                value.close()
        self._entries.clear()
        self._bytes = 0


def _size(key: str, value: Cached) -> int:
    if isinstance(value, Blob):
        return _ENTRY_OVERHEAD + len(key) + value.size
    return _ENTRY_OVERHEAD + len(key) + len(value or b"")
