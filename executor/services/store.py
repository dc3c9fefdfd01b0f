"""The run's shared store: `Store` (client, `ctx.store`) and `StoreTable` (its data).

One `StoreTable` lives in the run's services process and holds every key of the run,
so values written by earlier tasks are visible to later ones. Each worker process talks
to it through its own `Store`. The services process applies requests one at a time, in
the order each connection sent them: `incr` and `cas` are atomic across all workers.
Values are kept encoded (the services process unpickles only for `incr` and `cas`); big
ones stay in shared memory that is recycled: a replaced value's memfd goes back to the
process that replaced it, for its next big write (see `executor.services.memfd_values`).

`store[k] = v` does not wait for an answer (sending costs far less than a round trip).
Because one connection's requests are applied in order, the writer reads its own
writes, and an event it publishes after the write is seen after it. The worker waits
until its writes are applied (`settle`) before it reports a task finished, so every
later task sees them. A task running at the same time may see the old value for the
moment the write is in flight. When the socket is full, a write waits for its answer,
so a writer never runs ahead of the services process by more than that.

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

With EXECUTOR_FASTPATHS=off the services make no counter table and recycle no memfds
(`Tables` tells each `Store`), so every `incr` is a round trip and every big value gets
a new, sealed memfd. The read cache stays: it only reuses what the services answered.
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
from executor.services.memfd_values import HEADER, SPARES_MAX_BYTES, Recycled, Spares
from executor.services.protocol import (
    DONE,
    KEYS,
    PING,
    SHARE_TABLES,
    Cas,
    Counted,
    Delete,
    Get,
    Got,
    Has,
    Incr,
    Keys,
    MemfdRef,
    Message,
    Ok,
    Put,
    Reply,
    Set,
    ShareTables,
    Tables,
)
from executor.services.sharedmem import digest
from executor.services.value_cache import MISS, Cached, ValueCache
from executor.services.wire import (
    Blob,
    Connection,
    decode,
    encode,
    expect,
    load_held,
    same_value,
    take,
)

Answer = tuple[Reply, list[Blob]]
"""A reply of the services and the stored values it sends along."""

STORE_REQUESTS: frozenset[type[Message]] = frozenset(
    {ShareTables, Get, Set, Put, Delete, Has, Keys, Incr, Cas}
)
"""The requests a StoreTable applies (`Put` is not answered, not even with an error)."""

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
        reply, fds = conn.call(SHARE_TABLES)
        tables = expect(Tables, reply)
        fd = fds.popleft()
        try:
            self._map = mmap.mmap(fd, tables.versions_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self._spares: Spares | None = conn.spares if tables.recycling else None
        """Where big values may be written (None: a new sealed memfd each)."""
        self._counters: Counters | None = None
        if tables.counters_size:
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
        blob = encode(value, self._spares)
        self._cache.forget(key)
        self._entries.pop(key, None)  # the next incr asks the services, behind this write
        version = self._versions[_bucket(key)]
        enc = blob.enc
        kept: Cached = enc if isinstance(enc, bytes) else Blob(enc, os.dup(blob.fd))
        try:
            if self._conn.congested:
                self._conn.call(Set(key, enc), [blob])
            else:
                self._conn.cast(Put(key, enc), [blob])
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
            self._conn.call(PING, lock_timeout=_SETTLE_LOCK_S)
            self._unsettled = False

    def __delitem__(self, key: str) -> None:
        key = _check_key(key)
        self._entries.pop(key, None)
        self._cache.forget(key)
        self._conn.call(Delete(key))

    def __contains__(self, key: object) -> bool:
        key = _check_key(key)
        hit = self._cache.lookup(key, self._versions[_bucket(key)])
        if hit is not MISS:
            return hit is not None
        reply, _ = self._conn.call(Has(key))
        return bool(expect(Ok, reply).value)

    def get(self, key: str, default: Any = None) -> Any:
        found, value = self._read(_check_key(key))
        return value if found else default

    def keys(self) -> list[str]:
        """A snapshot of the keys, in insertion order."""
        reply, _ = self._conn.call(KEYS)
        return list(expect(Ok, reply).value)

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
        reply, _ = self._conn.call(Incr(key, n))
        counted = expect(Counted, reply)
        if counted.entry >= 0:
            self._entries[key] = (counted.entry, digest(key))
        return int(counted.value)

    def cas(self, key: str, expected: Any, new: Any) -> bool:
        """Atomically set `key` to `new` if it holds a value equal to `expected`.

        `expected=None` matches only a missing key. Returns whether `new` was stored.
        """
        key = _check_key(key)
        self._entries.pop(key, None)
        self._cache.forget(key)
        old = None if expected is None else encode(expected, self._spares)
        blob = encode(new, self._spares)
        blobs = [blob] if old is None else [old, blob]
        reply, _ = self._conn.call(Cas(key, None if old is None else old.enc, blob.enc), blobs)
        return bool(expect(Ok, reply).value)

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
            reply, fds = self._conn.call(Get(key))
            enc, version, cacheable, _ = expect(Got, reply)
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
    """The data of one run's store, inside the services process.

    With ``fastpaths`` False (EXECUTOR_FASTPATHS=off) it makes no counter table and
    gives no replaced memfd back as a spare, and its `Tables` answer says so.
    """

    def __init__(self, *, fastpaths: bool) -> None:
        self._data: dict[str, Blob] = {}
        self._recycling = fastpaths
        self._counters: Counters | None = None
        self._counters_fd = -1
        if fastpaths and counters_available():
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
        self._ops: dict[type[Message], Callable[[Any, deque[int]], Answer]] = {
            ShareTables: self._share_tables,
            Get: self._get,
            Set: self._set,
            Put: self._set,
            Delete: self._del,
            Has: self._has,
            Keys: self._keys,
            Incr: self._incr,
            Cas: self._cas,
        }

    def apply(self, msg: Message, fds: deque[int]) -> Answer:
        """Apply one request (of STORE_REQUESTS); the reply and the stored values it
        sends back. A key that is not a str raises TypeError."""
        return self._ops[type(msg)](msg, fds)

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
        ref = blob.enc
        if (
            self._recycling
            and isinstance(ref, MemfdRef)
            and ref.generation
            and HEADER + ref.size <= SPARES_MAX_BYTES
        ):
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

    def _share_tables(self, msg: ShareTables, fds: deque[int]) -> Answer:
        blobs = [Blob(b"", self._versions_fd)]
        if self._counters_fd >= 0:
            blobs.append(Blob(b"", self._counters_fd))
        counters_size = COUNTERS_SIZE if self._counters_fd >= 0 else 0
        return Tables(len(self._map), counters_size, self._recycling), blobs

    def _get(self, msg: Get, fds: deque[int]) -> Answer:
        key = _check_key(msg.key)
        blob = self._data.get(key)
        version = self._versions[_bucket(key)]
        if blob is None:
            return Got(None, version, True), []
        if blob is _COUNTER and self._counters is not None:  # changes without a version bump
            value = self._counters.read(self._counter_of[key])
            return Got(pickle.dumps(value, protocol=5), version, False), []
        return Got(blob.enc, version, True), [blob]

    def _set(self, msg: Set | Put, fds: deque[int]) -> Answer:
        self._put(_check_key(msg.key), take(msg.enc, fds))
        return DONE, []

    def _del(self, msg: Delete, fds: deque[int]) -> Answer:
        key = _check_key(msg.key)
        self._end_counter(key)
        self._retire(self._data.pop(key))
        self._changed(key)
        return DONE, []

    def _has(self, msg: Has, fds: deque[int]) -> Answer:
        return Ok(_check_key(msg.key) in self._data), []

    def _keys(self, msg: Keys, fds: deque[int]) -> Answer:
        return Ok(list(self._data)), []

    def _incr(self, msg: Incr, fds: deque[int]) -> Answer:
        """Add ``n``; the reply also names the key's counter entry (-1: none)."""
        key, n = _check_key(msg.key), msg.n
        entry = self._counter_of.get(key)
        if entry is not None and self._counters is not None:
            value = self._counters.add(entry, digest(key), n)
            if value is not None:
                return Counted(value, entry), []
            self._end_counter(key)  # leaving the 64-bit range: an ordinary value again
        old = self._data.get(key)
        current = 0 if old is None else decode(old)
        if type(current) is not int:
            raise TypeError(f"store.incr: {key!r} holds {type(current).__name__}, not int")
        value = current + n
        entry = self._new_counter(key, value)
        if entry < 0:
            self._put(key, Blob(pickle.dumps(value, protocol=5)))
        return Counted(value, entry), []

    def _cas(self, msg: Cas, fds: deque[int]) -> Answer:
        key = _check_key(msg.key)
        self._end_counter(key)  # compare and swap a value no process changes meanwhile
        old = self._data.get(key)
        want = None if msg.expected is None else take(msg.expected, fds)
        blob = take(msg.new, fds)
        if want is None:
            swap = old is None
        else:
            swap = old is not None and same_value(old, want)
            self._retire(want)
        if swap:
            self._put(key, blob)
        else:
            self._retire(blob)
        return Ok(swap), []
