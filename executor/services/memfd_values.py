"""Big values in memfds: the layout they share, and recycling for store values.

A value whose pickle reaches BIG_VALUE bytes travels as a memfd (executor.services.wire): a
HEADER-byte header, then the value's bytes. Event payloads are sealed: a subscriber may
read one long after it was published. Store values are recycled instead: writing into a
new memfd is mostly the kernel finding fresh pages, several times slower on a virtual
machine than writing into pages a memfd already has, and freeing them costs the
services process time too. So when the services process replaces or deletes a store
value, it gives the value's memfd back to the connection whose request did that, as a
spare (`Spares`), and that process's next big write goes into its pages. With
EXECUTOR_FASTPATHS=off they do not, and every big store value is a new, sealed memfd.

A reader may still hold a recycled memfd: the services sent it before the value was
replaced. The header holds a generation that a writer bumps under an exclusive POSIX
lock on the file; a reply names the generation it sent, and `read` copies under a
shared lock, checking the generation before and after, or raises `Recycled` (ask
again). POSIX locks belong to a process, not to a thread, so a process-wide lock keeps
one thread's write out of another thread's read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

HEADER = 48
"""Bytes before the value in every memfd value: the generation, then padding.

The kernel's copy between a process and a memfd runs ~7 times slower on these CPUs
when the destination lies a few bytes (1-63) past the source modulo 4 KiB. A big bytes
object's data starts 48 bytes into a page (a 16-byte malloc header for its own mapping,
then CPython's 32-byte object header), so at offset 48 both the writer's copy in and a
reader's copy out into a new bytes object keep the same offset within the page."""
SPARES_MAX = 4
"""Spares one connection holds at most (the oldest go first) ..."""
SPARES_MAX_BYTES = 32 << 20
"""... and at most this many bytes of them; bigger values are never recycled."""

_GEN = struct.Struct("<Q")
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_local = threading.Lock()  # POSIX locks do not exclude this process's own threads

T = TypeVar("T")


class Recycled(Exception):
    """The memfd of a store value was reused for a newer value after it was sent."""


def sealed(parts: Sequence[Any]) -> int:
    """A new memfd holding ``parts``, sealed against any change."""
    fd = _new()
    try:
        _write(fd, parts)
        _seal(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _seal(fd: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except OSError as exc:
        # EBUSY: the kernel waited ~150 ms for passing references to the pages to go
        # (seen while a profiler sampled the process); the seals only guard against a
        # write that nothing makes, so the value goes unsealed rather than failing.
        if exc.errno != errno.EBUSY:
            raise


def recyclable(parts: Sequence[Any], size: int, spares: Spares) -> tuple[int, int]:
    """A memfd holding ``parts`` (a spare if one fits and no reader holds it), and the
    generation a reader must find in it."""
    fd = spares.take(HEADER + size)
    if fd is not None:
        try:
            with _local:
                generation = _rewrite(fd, parts)
        except BaseException:
            os.close(fd)
            raise
        if generation:
            return fd, generation
        os.close(fd)  # a reader is copying out of it right now
    fd = _new()
    try:
        os.pwrite(fd, _GEN.pack(1), 0)
        _write(fd, parts)
    except BaseException:
        os.close(fd)
        raise
    return fd, 1


def read(fd: int, generation: int, copy: Callable[[], T]) -> T:
    """``copy()`` of a memfd value, once it is known to hold ``generation`` (0: sealed).

    Raises Recycled when the memfd holds another value by now.
    """
    if not generation:
        return copy()
    with _local:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        try:
            _check(fd, generation)
            data = copy()
            # again after the copy: closing any other descriptor of this memfd in this
            # process drops the lock (POSIX), and a writer bumps the generation first
            _check(fd, generation)
            return data
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)


def _check(fd: int, generation: int) -> None:
    if _GEN.unpack(os.pread(fd, _GEN.size, 0))[0] != generation:
        raise Recycled


def read_bytes(fd: int, size: int) -> bytes:
    """The ``size`` bytes of a memfd value."""
    data = os.pread(fd, size, HEADER)
    if len(data) == size:
        return data
    buf = bytearray(size)
    read_into(fd, buf)
    return bytes(buf)


def read_into(fd: int, buf: bytearray) -> None:
    """Fill ``buf`` with a memfd value's bytes."""
    view, pos = memoryview(buf), 0
    while pos < len(buf):
        got = os.preadv(fd, [view[pos:]], HEADER + pos)
        if got <= 0:
            raise ValueError("a shared value is shorter than recorded")
        pos += got


class Spares:
    """Memfds of replaced store values that the services gave back to this process.

    The services send them when they replace the value; ``refill`` reads what has
    arrived on the connection without waiting.
    """

    def __init__(self, refill: Callable[[], None]) -> None:
        self._refill = refill
        self._lock = threading.Lock()
        self._pool: list[tuple[int, int]] = []  # (fd, file size), the newest last

    def add(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        dropped = []
        with self._lock:
            self._pool.append((fd, size))
            total = sum(size for _, size in self._pool)
            while len(self._pool) > SPARES_MAX or total > SPARES_MAX_BYTES:
                old, old_size = self._pool.pop(0)
                total -= old_size
                dropped.append(old)
        for old in dropped:
            os.close(old)

    def take(self, need: int) -> int | None:
        """A spare of at least ``need`` bytes and not twice as big, or None."""
        self._refill()
        with self._lock:
            for index in range(len(self._pool) - 1, -1, -1):
                fd, size = self._pool[index]
                if need <= size <= 2 * need:
                    del self._pool[index]
                    return fd
        return None

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        for fd, _ in pool:
            os.close(fd)


def _new() -> int:
    return os.memfd_create("executor-value", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)


def _rewrite(fd: int, parts: Sequence[Any]) -> int:
    """Write a new value into a spare; its new generation, or 0 if a reader holds it."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0
    try:
        generation: int = _GEN.unpack(os.pread(fd, _GEN.size, 0))[0] + 1
        os.pwrite(fd, _GEN.pack(generation), 0)  # before the value: see read()
        _write(fd, parts)
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    return generation


def _write(fd: int, parts: Sequence[Any]) -> None:
    views = [memoryview(part).cast("B") for part in parts]
    pos = HEADER
    while views:
        written = os.pwritev(fd, views, pos)
        pos += written
        while views and written >= views[0].nbytes:
            written -= views.pop(0).nbytes
        if views:
            views[0] = views[0][written:]
