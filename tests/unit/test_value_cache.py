"""ValueCache: entries valid for a range of bucket versions, bounded in size."""

from __future__ import annotations

import os

from executor.services.protocol import MemfdRef
from executor.services.value_cache import MAX_BYTES, MISS, ValueCache
from executor.services.wire import Blob
from tests.descriptors import is_open


def test_an_entry_answers_only_inside_its_version_range() -> None:
    cache = ValueCache()
    cache.remember("written", 5, 6, b"pickle")
    cache.remember("absent", 3, 3, None)
    assert [cache.lookup("written", v) for v in (4, 5, 6, 7)] == [MISS, b"pickle", b"pickle", MISS]
    assert cache.lookup("absent", 3) is None
    assert cache.lookup("other", 3) is MISS


def held(size: int) -> Blob:
    fd = os.memfd_create("test-held")
    return Blob(MemfdRef("bytes", size, (), 1), fd)


def test_held_memfds_are_closed_when_forgotten_replaced_or_dropped() -> None:
    cache = ValueCache()
    first, second, third = held(MAX_BYTES // 2), held(MAX_BYTES // 2), held(MAX_BYTES // 2)
    fds = [first.fd, second.fd, third.fd]
    cache.remember("a", 1, 1, first)
    cache.remember("a", 2, 2, second)  # replaces the first
    assert [is_open(fd) for fd in fds] == [False, True, True]
    cache.remember("b", 1, 1, third)  # past MAX_BYTES: the cache starts over with it
    assert [is_open(fd) for fd in fds] == [False, False, True]
    assert cache.lookup("a", 2) is MISS and cache.lookup("b", 1) is third
    cache.forget("b")
    assert not is_open(fds[2])


def test_clear_closes_everything() -> None:
    cache = ValueCache()
    blob = held(1)
    fd = blob.fd
    cache.remember("k", 0, 0, blob)
    cache.clear()
    assert not is_open(fd) and cache.lookup("k", 0) is MISS
