"""Shared-memory counters: `store.incr` without a round trip to the services process.

The first `incr` of a key goes to the services process, which turns the key into a
counter: an entry of this table (a memfd every Store maps) holding the key's digest, its
int value and a process-shared robust mutex. The reply names the entry, and from then on
each process increments it in place under the mutex, without a round trip. The
services process stays the authority over the key: it reads the entry
for `get` (answered as not cacheable) and retires it, under the same mutex, before a
`set`, `del` or `cas` replaces the value; an `incr` that finds its entry retired asks
the services again. The mutex is robust: when a process dies holding it, the next one
takes it over (the value is written in one 8-byte store, so it is never half-updated).
Entries are never reused within a run; when the table is full, counters stay in the
services process (an `incr` is then a round trip, as before), as they do with
EXECUTOR_FASTPATHS=off (the services make no table then).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from executor.services.sharedmem import DIGEST_SIZE, load_libc, map_memfd

ENTRIES = 4096
_ENTRY = 128
COUNTERS_SIZE = ENTRIES * _ENTRY
_MUTEX = 0  # pthread_mutex_t: 40 bytes on x86_64, 48 on aarch64
_DIGEST = 64  # DIGEST_SIZE bytes: which key the entry counts (sharedmem.digest)
_FIELDS = struct.Struct("<qI")  # at 80: the value, and the state below
_FIELDS_AT = 80
_ACTIVE, _RETIRED = 1, 2  # states; 0: never handed out
_ATTR_SIZE = 64  # room for pthread_mutexattr_t on every 64-bit glibc


_POINTER = ctypes.c_void_p
# Without these (not glibc), counters stay in the services process.
_libc = load_libc(
    {
        "pthread_mutexattr_init": [_POINTER],
        "pthread_mutexattr_setpshared": [_POINTER, ctypes.c_int],
        "pthread_mutexattr_setrobust": [_POINTER, ctypes.c_int],
        "pthread_mutex_init": [_POINTER, _POINTER],
        "pthread_mutex_lock": [_POINTER],
        "pthread_mutex_unlock": [_POINTER],
        "pthread_mutex_consistent": [_POINTER],
    }
)


def available() -> bool:
    return _libc is not None


def fits(value: int) -> bool:
    """Whether an entry can hold ``value`` (a signed 64-bit int)."""
    return -(1 << 63) <= value < 1 << 63


class Counters:
    """One process's view of the run's counter table (made by `create()`)."""

    def __init__(self, fd: int) -> None:
        if _libc is None:
            raise OSError("no process-shared robust mutexes here")
        self._libc = _libc
        self._map, self._base = map_memfd(fd, COUNTERS_SIZE)
        self._used = 0  # entries handed out (the services process only)

    @classmethod
    def create(cls) -> tuple[int, Counters]:
        """A new, empty table (its memfd, to share) with every mutex initialised."""
        fd = os.memfd_create("executor-store-counters", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, COUNTERS_SIZE)
            table = cls(fd)
            table._init_mutexes()
        except BaseException:
            os.close(fd)
            raise
        return fd, table

    def _init_mutexes(self) -> None:
        libc = self._libc
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        if (
            libc.pthread_mutexattr_init(attr)
            or libc.pthread_mutexattr_setpshared(attr, 1)  # PTHREAD_PROCESS_SHARED
            or libc.pthread_mutexattr_setrobust(attr, 1)  # PTHREAD_MUTEX_ROBUST
        ):
            raise OSError("cannot make a process-shared robust mutex")
        for entry in range(ENTRIES):
            if libc.pthread_mutex_init(self._base + entry * _ENTRY + _MUTEX, attr):
                raise OSError("pthread_mutex_init failed")

    # --- the services process ---------------------------------------------------------

    def allocate(self, digest: bytes, value: int) -> int:
        """A new active entry for a key holding ``value``; -1 when the table is full."""
        if self._used == ENTRIES:
            return -1
        entry, self._used = self._used, self._used + 1
        start = entry * _ENTRY
        self._map[start + _DIGEST : start + _DIGEST + DIGEST_SIZE] = digest
        _FIELDS.pack_into(self._map, start + _FIELDS_AT, value, _ACTIVE)
        return entry

    def read(self, entry: int) -> int:
        """The entry's value now."""
        with self._locked(entry):
            value: int = _FIELDS.unpack_from(self._map, entry * _ENTRY + _FIELDS_AT)[0]
        return value

    def retire(self, entry: int) -> int:
        """End the entry (later increments ask the services); its final value."""
        at = entry * _ENTRY + _FIELDS_AT
        with self._locked(entry):
            value: int = _FIELDS.unpack_from(self._map, at)[0]
            _FIELDS.pack_into(self._map, at, value, _RETIRED)
        return value

    # --- every process ------------------------------------------------------------------

    def add(self, entry: int, digest: bytes, n: int) -> int | None:
        """Add ``n`` to the entry if it still counts the key of ``digest``; the new value,
        or None when it was retired (ask the services)."""
        start = entry * _ENTRY
        at = start + _FIELDS_AT
        board = self._map
        with self._locked(entry):
            value, state = _FIELDS.unpack_from(board, at)
            if state != _ACTIVE or board[start + _DIGEST : start + _DIGEST + DIGEST_SIZE] != digest:
                return None
            value += n
            if not fits(value):
                return None  # the services keep it as an ordinary value from now on
            _FIELDS.pack_into(board, at, value, _ACTIVE)
        return int(value)

    def _locked(self, entry: int) -> _Lock:
        return _Lock(self._libc, self._base + entry * _ENTRY + _MUTEX)


class _Lock:
    """``with``: hold one entry's robust mutex (taking it over from a dead holder)."""

    __slots__ = ("_libc", "_mutex")

    def __init__(self, libc: ctypes.CDLL, mutex: int) -> None:
        self._libc, self._mutex = libc, mutex

    def __enter__(self) -> None:
        code = self._libc.pthread_mutex_lock(self._mutex)
        if code == errno.EOWNERDEAD:  # its holder died: the value is whole, carry on
            self._libc.pthread_mutex_consistent(self._mutex)
        elif code:
            raise OSError(code, os.strerror(code))

    def __exit__(self, *exc: object) -> None:
        self._libc.pthread_mutex_unlock(self._mutex)
