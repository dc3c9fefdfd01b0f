"""Recycled memfds for big store values: spares, generations and the reader's lock."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from collections.abc import Iterator

import pytest

from executor.services import memfd_values
from executor.services.memfd_values import HEADER, SPARES_MAX, SPARES_MAX_BYTES, Recycled, Spares
from tests.descriptors import is_open

MIB = 1 << 20


@pytest.fixture
def spares() -> Iterator[Spares]:
    pool = Spares(refill=lambda: None)
    yield pool
    pool.close()


def written(data: bytes, spares: Spares) -> tuple[int, int]:
    return memfd_values.recyclable([data], len(data), spares)


def read(fd: int, generation: int, size: int) -> bytes:
    return memfd_values.read(fd, generation, functools.partial(memfd_values.read_bytes, fd, size))


def test_a_spare_is_written_in_place_and_readers_of_its_old_value_are_told(
    spares: Spares,
) -> None:
    first, generation = written(b"a" * MIB, spares)
    stale = os.dup(first)  # a reader that got the first value and has not read it yet
    inode = os.fstat(first).st_ino
    spares.add(first)  # the services replaced the value and gave its memfd back
    second, new_generation = written(b"b" * MIB, spares)
    try:
        assert os.fstat(second).st_ino == inode, "the spare's pages were reused"
        assert new_generation == generation + 1
        assert read(second, new_generation, MIB) == b"b" * MIB
        with pytest.raises(Recycled):
            read(stale, generation, MIB)
    finally:
        os.close(second)
        os.close(stale)


def test_a_spare_a_reader_is_copying_from_is_left_alone(spares: Spares) -> None:
    fd, generation = written(b"a" * MIB, spares)
    ready, go = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the reader: holds the shared lock as `read` does while copying
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
            os.write(ready[1], b"x")
            os.read(go[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready[0], 1) == b"x"
        spares.add(os.dup(fd))
        other, other_generation = written(b"b" * MIB, spares)
        assert os.fstat(other).st_ino != os.fstat(fd).st_ino, "a new memfd, not the read one"
        assert other_generation == 1
        os.close(other)
    finally:
        os.write(go[1], b"x")
        os.waitpid(pid, 0)
        for end in (*ready, *go):
            os.close(end)
    assert read(fd, generation, MIB) == b"a" * MIB, "the reader's value is intact"
    os.close(fd)


@pytest.mark.parametrize(
    ("spare_size", "value_size", "reused"),
    [
        (MIB, MIB, True),
        (MIB, MIB // 2 + 1, True),
        (MIB, MIB // 2 - HEADER, False),
        (MIB, 2 * MIB, False),
    ],
    ids=["same size", "just over half", "under half", "too small"],
)
def test_a_spare_is_used_only_for_a_value_it_fits_without_waste(
    spares: Spares, spare_size: int, value_size: int, reused: bool
) -> None:
    spare, _ = written(b"s" * spare_size, spares)
    inode = os.fstat(spare).st_ino
    spares.add(spare)
    fd, _ = written(b"v" * value_size, spares)
    try:
        assert (os.fstat(fd).st_ino == inode) is reused
        generation = int.from_bytes(os.pread(fd, 8, 0), "little")
        assert read(fd, generation, value_size) == b"v" * value_size
    finally:
        os.close(fd)


def memfd_of(size: int) -> int:
    fd = os.memfd_create("test-spare")
    os.ftruncate(fd, size)
    return fd


@pytest.mark.parametrize(
    "sizes",
    [[MIB] * (SPARES_MAX + 1), [SPARES_MAX_BYTES // 2 + MIB, SPARES_MAX_BYTES // 2]],
    ids=["count", "bytes"],
)
def test_spares_beyond_the_limits_are_closed_oldest_first(spares: Spares, sizes: list[int]) -> None:
    fds = [memfd_of(size) for size in sizes]
    for fd in fds:
        spares.add(fd)
    assert [is_open(fd) for fd in fds] == [False] + [True] * (len(fds) - 1)


def test_sealed_values_need_no_generation() -> None:
    fd = memfd_values.sealed([b"a" * MIB])
    try:
        assert read(fd, 0, MIB) == b"a" * MIB
        with pytest.raises(PermissionError):
            os.pwrite(fd, b"!", HEADER)
    finally:
        os.close(fd)


def test_a_value_the_kernel_refuses_to_seal_goes_unsealed(monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(fd: int, command: int, arg: int = 0) -> int:
        if command == fcntl.F_ADD_SEALS:
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(fd, command, arg)

    real = fcntl.fcntl
    monkeypatch.setattr(fcntl, "fcntl", busy)
    fd = memfd_values.sealed([b"a" * MIB])
    try:
        assert read(fd, 0, MIB) == b"a" * MIB
    finally:
        os.close(fd)


def test_a_value_rewritten_while_it_is_copied_is_not_returned(spares: Spares) -> None:
    """A reader's lock is gone once its process closes another descriptor of the memfd
    (POSIX): a writer may then strike mid-copy, and its generation bump tells."""
    fd, generation = written(b"a" * MIB, spares)

    def copy_during_a_write() -> bytes:
        data = memfd_values.read_bytes(fd, MIB)
        os.pwrite(fd, (generation + 1).to_bytes(8, "little"), 0)
        return data

    try:
        with pytest.raises(Recycled):
            memfd_values.read(fd, generation, copy_during_a_write)
    finally:
        os.close(fd)
