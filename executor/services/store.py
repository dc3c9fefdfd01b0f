"""The run's shared store: `Store` (client, `ctx.store`) and `StoreTable` (its data).

One `StoreTable` lives in the run's services process and holds every key of the run,
so values written by earlier tasks are visible to later ones. Each worker process talks
to it through its own `Store`. The services process applies requests one at a time, in
the order each connection sent them: `incr` and `cas` are atomic across all workers.
Values are kept encoded (the services process unpickles only for `incr` and `cas`); big
ones stay in shared memory that is recycled: a replaced value's memfd goes back to the
process that replaced it, for its next big write (see `executor.services.memfd_values`).

`store[k] = v` does not wait for an answer (a round trip costs 70-150 us on a virtual
machine; sending costs a few). Because one connection's requests are applied in order,
the writer reads its own writes, and an event it publishes after the write is seen after
it. The worker waits until its writes are applied (`settle`) before it reports a task
finished, so every later task sees them. A task running at the same time may see the
old value for the moment the write is in flight. When the socket is full, a write waits
for its answer, so a writer never runs ahead of the services process by more than that.

Reads of unchanged keys need no round trip: a `Store` remembers the values it read and
wrote with the versions of their keys' buckets in a table the services process keeps in
shared memory (executor/services/value_cache.py); while a key's bucket is unchanged, `store[k]`,
`store.get(k)` and `k in store` answer from memory (a fresh copy each time).

`incr` needs no round trip either once a key is a counter: the first `incr` of a key
moves its int into the counter table in shared memory (executor/services/counters.py), and every
process then adds to it in place under the entry's mutex. The services process reads
the entry for `get` (an answer never cached, since the value changes without a version
bump) and retires it before a `set`, `del` or `cas` of the key; a process drops its
knowledge of a counter when it writes the key itself, so its own write and a later
`incr` keep their order.
"""

from __future__ import annotations

import mmap
import os
import pickle
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from executor.services.counters import COUNTERS_SIZE, Counters, fits
from executor.services.counters import available as counters_available
from executor.services.memfd_values import HEADER, SPARES_MAX_BYTES, Recycled
from executor.services.sharedmem import digest
from executor.services.value_cache import MISS, Cached, ValueCache
from executor.services.wire import (
    Blob,
    Connection,
    Message,
    decode,
    encode,
    load_held,
    same_value,
    take,
)

Reply = tuple[Message, list[Blob]]

STORE_OPS = frozenset({"get", "set", "put", "del", "has", "keys", "incr", "cas", "versions"})
"""The requests a StoreTable applies."""
UNANSWERED_OPS = frozenset({"put"})
"""Requests the client does not wait for: no reply is sent, not even an error."""

_BUCKETS = 1 << 16
_RETIRED_MAX = 32  # replaced big values kept for release while the services are idle
_SETTLE_LOCK_S = 0.5  # how long settle() waits for a connection another thread holds


def _bucket(key: str) -> int:
    """The version bucket of `key` (the same in every process, unlike hash())."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) & (_BUCKETS - 1)


def _check_key(key: object) -> str:
    if type(key) is not str:
        raise TypeError(f"store keys must be str, not {type(key).__name__}")
    return key


class Store:
    """Dict-like access to the run's store (`ctx.store`); one per worker process.

    Raises KeyError for a missing key, TypeError for a non-str key or an `incr` on a
    value that is not an int. Values are any picklable object; reading one returns a
    fresh copy, so mutate-then-assign (`d = store[k]; d[x] = y; store[k] = d`).
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        reply, fds = conn.call(("versions",))
        fd = fds.popleft()
        try:
            self._map = mmap.mmap(fd, reply[1], prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._counters: Counters | None = None
        if reply[2]:
            fd = fds.popleft()
            try:
                self._counters = Counters(fd)
            finally:
                os.close(fd)
        self._entries: dict[str, tuple[int, bytes]] = {}
        """Keys this process incremented that are counters: (entry, key digest)."""
        self._versions = memoryview(self._map).cast("Q")
        self._cache = ValueCache()
        self._unsettled = False
        """Writes were sent since the last settle()."""

    def __reduce__(self) -> Any:
        raise TypeError("a Store cannot be pickled: give workers the services address")

    def __getitem__(self, key: str) -> Any:
        found, value = self._read(_check_key(key))
        if not found:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        key = _check_key(key)
        blob = encode(value, self._conn.spares)
        self._cache.forget(key)
        self._entries.pop(key, None)  # the next incr asks the services, behind this write
        version = self._versions[_bucket(key)]
        enc = blob.enc
        kept: Cached = enc if isinstance(enc, bytes) else Blob(enc, os.dup(blob.fd))
        try:
            if self._conn.congested:
                self._conn.call(("set", key, enc), [blob])
            else:
                self._conn.cast(("put", key, enc), [blob])
                self._unsettled = True
        except BaseException:
            if isinstance(kept, Blob):
                kept.close()
            raise
        # the latest value until the bucket changes again after this write is applied
        self._cache.remember(key, version, version + 1, kept)

    def settle(self) -> None:
        """Wait until the services process has applied every write sent from here.

        Raises ServiceError when the services are gone, or when a thread the task left
        behind keeps the connection blocked in `ctx.events` (then later tasks may see
        the writes a moment late).
        """
        if self._unsettled:
            self._conn.call(("ping",), lock_timeout=_SETTLE_LOCK_S)
            self._unsettled = False

    def __delitem__(self, key: str) -> None:
        key = _check_key(key)
        self._entries.pop(key, None)
        self._cache.forget(key)
        self._conn.call(("del", key))

    def __contains__(self, key: object) -> bool:
        key = _check_key(key)
        hit = self._cache.lookup(key, self._versions[_bucket(key)])
        if hit is not MISS:
            return hit is not None
        reply, _ = self._conn.call(("has", key))
        return bool(reply[1])

    def get(self, key: str, default: Any = None) -> Any:
        found, value = self._read(_check_key(key))
        return value if found else default

    def keys(self) -> list[str]:
        """A snapshot of the keys, in insertion order."""
        reply, _ = self._conn.call(("keys",))
        return list(reply[1])

    def __iter__(self) -> Iterator[str]:
        """Iterates a snapshot of the keys (see `keys`)."""
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def incr(self, key: str, n: int = 1) -> int:
        """Atomically add `n` to the int at `key` (a missing key counts as 0); the new value."""
        if type(n) is not int:
            raise TypeError(f"store.incr: n must be int, not {type(n).__name__}")
        key = _check_key(key)
        counter = self._entries.get(key)
        if counter is not None and self._counters is not None:
            value = self._counters.add(*counter, n)
            if value is not None:
                return value
            del self._entries[key]  # no longer a counter: ask the services
        reply, _ = self._conn.call(("incr", key, n))
        if reply[2] >= 0:
            self._entries[key] = (reply[2], digest(key))
        return int(reply[1])

    def cas(self, key: str, expected: Any, new: Any) -> bool:
        """Atomically set `key` to `new` if it holds a value equal to `expected`.

        `expected=None` matches only a missing key. Returns whether `new` was stored.
        """
        key = _check_key(key)
        self._entries.pop(key, None)
        self._cache.forget(key)
        old = None if expected is None else encode(expected, self._conn.spares)
        blob = encode(new, self._conn.spares)
        blobs = [blob] if old is None else [old, blob]
        reply, _ = self._conn.call(("cas", key, old and old.enc, blob.enc), blobs)
        return bool(reply[1])

    def close(self) -> None:
        """Close the connection (shared with this process's Events)."""
        self._conn.close()
        self._cache.clear()
        self._versions.release()
        self._map.close()

    def _read(self, key: str) -> tuple[bool, Any]:
        """(found, value) of `key`: from the cache while its bucket is unchanged."""
        hit = self._cache.lookup(key, self._versions[_bucket(key)])
        if hit is None:
            return False, None
        if isinstance(hit, bytes):
            return True, pickle.loads(hit)
        if isinstance(hit, Blob):
            try:
                return True, load_held(hit)
            except Recycled:  # replaced, and its memfd reused, since the version check
                self._cache.forget(key)
        while True:
            reply, fds = self._conn.call(("get", key))
            _, enc, version, cacheable = reply
            if enc is None or isinstance(enc, bytes):
                if cacheable:
                    self._cache.remember(key, version, version, enc)
                return (False, None) if enc is None else (True, pickle.loads(enc))
            blob = take(enc, fds)
            try:
                value = load_held(blob)
            except Recycled:
                blob.close()
                continue  # replaced since the services answered: ask for the new value
            except BaseException:
                blob.close()
                raise
            self._cache.remember(key, version, version, blob)
            return True, value


_COUNTER = Blob(b"")
"""StoreTable's value of a key whose int lives in the counter table (counters.py)."""


class StoreTable:
    """The data of one run's store, inside the services process."""

    def __init__(self) -> None:
        self._data: dict[str, Blob] = {}
        self._counters: Counters | None = None
        self._counters_fd = -1
        if counters_available():
            self._counters_fd, self._counters = Counters.create()
        self._counter_of: dict[str, int] = {}  # key -> its entry in the counter table
        self._retired: list[Blob] = []  # replaced big values, released when the loop is idle
        self.freed: list[Blob] = []
        """Recyclable memfds the current request replaced: spares for its sender."""
        size = _BUCKETS * 8
        self._versions_fd = os.memfd_create("executor-store-versions", os.MFD_CLOEXEC)
        os.ftruncate(self._versions_fd, size)
        self._map = mmap.mmap(self._versions_fd, size)
        self._versions = memoryview(self._map).cast("Q")
        self._ops: dict[str, Callable[..., Reply]] = {
            "versions": self._share_versions,
            "get": self._get,
            "set": self._set,
            "put": self._set,
            "del": self._del,
            "has": self._has,
            "keys": self._keys,
            "incr": self._incr,
            "cas": self._cas,
        }

    def apply(self, msg: Message, fds: deque[int]) -> Reply:
        """Apply one request; the reply and the stored values it sends back."""
        if len(msg) > 1 and type(msg[1]) is not str:
            _check_key(msg[1])
        return self._ops[msg[0]](fds, *msg[1:])

    @property
    def has_retired(self) -> bool:
        return bool(self._retired)

    def release_retired(self) -> None:
        """Free the memory of replaced big values (slow on some VMs: kept off the replies)."""
        for blob in self._retired:
            blob.close()
        self._retired.clear()

    def close(self) -> None:
        self.release_retired()
        for blob in self.freed:
            blob.close()
        for blob in self._data.values():
            blob.close()
        self._data.clear()
        self._versions.release()
        self._map.close()
        os.close(self._versions_fd)
        if self._counters_fd >= 0:
            os.close(self._counters_fd)

    def _changed(self, key: str) -> None:
        """Bump the version of `key`'s bucket: cached copies of it are stale now."""
        self._versions[_bucket(key)] += 1

    def release_later(self, blob: Blob) -> None:
        """Free a big value's memory once the loop is idle."""
        self._retired.append(blob)
        if len(self._retired) > _RETIRED_MAX:
            self.release_retired()

    def _retire(self, blob: Blob | None) -> None:
        if blob is None or blob.fd < 0:
            return
        _, _, size, _, generation = blob.enc
        if generation and HEADER + size <= SPARES_MAX_BYTES:
            self.freed.append(blob)
        else:
            self.release_later(blob)

    def _put(self, key: str, blob: Blob) -> None:
        self._end_counter(key)
        self._retire(self._data.pop(key, None))
        self._data[key] = blob
        self._changed(key)

    def _end_counter(self, key: str) -> None:
        """If ``key`` is a counter, retire its entry and hold its final value here again
        (a value unchanged: cached copies stay valid)."""
        entry = self._counter_of.pop(key, None)
        if entry is not None and self._counters is not None:
            self._data[key] = Blob(pickle.dumps(self._counters.retire(entry), protocol=5))

    def _new_counter(self, key: str, value: int) -> int:
        """Make ``key`` a counter holding ``value``; its entry, or -1 (it stays here)."""
        if self._counters is None or not fits(value):
            return -1
        entry = self._counters.allocate(digest(key), value)
        if entry >= 0:
            self._retire(self._data.pop(key, None))
            self._data[key] = _COUNTER
            self._counter_of[key] = entry
            self._changed(key)
        return entry

    def _share_versions(self, fds: deque[int]) -> Reply:
        blobs = [Blob(b"", self._versions_fd)]
        if self._counters_fd >= 0:
            blobs.append(Blob(b"", self._counters_fd))
        return ("ok", len(self._map), COUNTERS_SIZE if self._counters_fd >= 0 else 0), blobs

    def _get(self, fds: deque[int], key: str) -> Reply:
        blob = self._data.get(key)
        version = self._versions[_bucket(key)]
        if blob is None:
            return ("ok", None, version, True), []
        if blob is _COUNTER and self._counters is not None:  # changes without a version bump
            value = self._counters.read(self._counter_of[key])
            return ("ok", pickle.dumps(value, protocol=5), version, False), []
        return ("ok", blob.enc, version, True), [blob]

    def _set(self, fds: deque[int], key: str, enc: Any) -> Reply:
        self._put(key, take(enc, fds))
        return ("ok", None), []

    def _del(self, fds: deque[int], key: str) -> Reply:
        self._end_counter(key)
        self._retire(self._data.pop(key))
        self._changed(key)
        return ("ok", None), []

    def _has(self, fds: deque[int], key: str) -> Reply:
        return ("ok", key in self._data), []

    def _keys(self, fds: deque[int]) -> Reply:
        return ("ok", list(self._data)), []

    def _incr(self, fds: deque[int], key: str, n: int) -> Reply:
        """Add ``n``; the reply also names the key's counter entry (-1: none)."""
        entry = self._counter_of.get(key)
        if entry is not None and self._counters is not None:
            value = self._counters.add(entry, digest(key), n)
            if value is not None:
                return ("ok", value, entry), []
            self._end_counter(key)  # leaving the 64-bit range: an ordinary value again
        old = self._data.get(key)
        current = 0 if old is None else decode(old)
        if type(current) is not int:
            raise TypeError(f"store.incr: {key!r} holds {type(current).__name__}, not int")
        value = current + n
        entry = self._new_counter(key, value)
        if entry < 0:
            self._put(key, Blob(pickle.dumps(value, protocol=5)))
        return ("ok", value, entry), []

    def _cas(self, fds: deque[int], key: str, expected: Any, new: Any) -> Reply:
        self._end_counter(key)  # compare and swap a value no process changes meanwhile
        old = self._data.get(key)
        want = None if expected is None else take(expected, fds)
        blob = take(new, fds)
        if want is None:
            swap = old is None
        else:
            swap = old is not None and same_value(old, want)
            self._retire(want)
        if swap:
            self._put(key, blob)
        else:
            self._retire(blob)
        return ("ok", swap), []
