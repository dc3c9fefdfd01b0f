"""The shared-memory counter table (executor/services/counters.py) and how StoreTable uses it."""

from __future__ import annotations

import os
import pickle
import signal
from collections import deque
from collections.abc import Iterator

import pytest

from executor.services import counters
from executor.services.counters import Counters
from executor.services.protocol import KEYS, Cas, Counted, Delete, Get, Got, Has, Incr, Ok, Set
from executor.services.sharedmem import digest as key_digest
from executor.services.store import StoreTable
from executor.services.wire import expect
from tests.shared_tables import second_mapping

pytestmark = pytest.mark.skipif(not counters.available(), reason="needs glibc robust mutexes")


@pytest.fixture
def table() -> Iterator[Counters]:
    yield from second_mapping(Counters.create, Counters)


def test_entries_count_and_retire(table: Counters) -> None:
    entry = table.allocate(key_digest("k"), 5)
    assert table.add(entry, key_digest("k"), 2) == 7
    assert table.add(entry, key_digest("other"), 1) is None, "an entry counts one key"
    assert table.read(entry) == 7
    assert table.retire(entry) == 7
    assert table.add(entry, key_digest("k"), 1) is None, "retired: ask the services"
    assert table.read(entry) == 7


def test_values_stay_in_64_bits(table: Counters) -> None:
    entry = table.allocate(key_digest("k"), (1 << 63) - 2)
    assert table.add(entry, key_digest("k"), 1) == (1 << 63) - 1
    assert table.add(entry, key_digest("k"), 1) is None
    assert table.read(entry) == (1 << 63) - 1


def test_a_full_table_hands_out_no_entry(table: Counters) -> None:
    assert [table.allocate(key_digest(f"k{i}"), 0) for i in range(counters.ENTRIES)] == list(
        range(counters.ENTRIES)
    )
    assert table.allocate(key_digest("one more"), 0) == -1


def test_a_holder_that_dies_does_not_wedge_the_counter(table: Counters) -> None:
    entry = table.allocate(key_digest("k"), 1)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child takes the mutex and dies holding it
        table._locked(entry).__enter__()
        os.write(ready_w, b"x")
        signal.pause()
        os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"x"
    os.close(ready_r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert table.add(entry, key_digest("k"), 1) == 2
    assert table.add(entry, key_digest("k"), 1) == 3


def get(store: StoreTable, key: str) -> tuple[object, bool]:
    """(value, cacheable) of a get, as the services answer it."""
    reply, blobs = store.apply(Get(key), deque())
    got = expect(Got, reply)
    enc = blobs[0].enc if blobs else got.enc
    assert isinstance(enc, bytes)
    return pickle.loads(enc), got.cacheable


def test_incr_makes_a_counter_that_workers_change_in_place() -> None:
    store = StoreTable(fastpaths=True)
    reply, _ = store.apply(Incr("n", 2), deque())
    counted = expect(Counted, reply)
    assert counted.value == 2 and counted.entry >= 0
    assert store._counters is not None
    fd = store._counters_fd
    assert Counters(fd).add(counted.entry, key_digest("n"), 40) == 42  # a worker, no request
    assert get(store, "n") == (42, False), "a counter's value is never cached"
    assert expect(Counted, store.apply(Incr("n", 1), deque())[0]).value == 43
    assert expect(Ok, store.apply(KEYS, deque())[0]).value == ["n"]
    assert expect(Ok, store.apply(Has("n"), deque())[0]).value is True


@pytest.mark.parametrize(
    ("request_", "then"),
    [
        (Set("n", pickle.dumps("text")), "text"),
        (Cas("n", pickle.dumps(42), pickle.dumps(100)), 100),
        (Delete("n"), None),
    ],
)
def test_writes_end_the_counter_first(request_: Set | Cas | Delete, then: object) -> None:
    store = StoreTable(fastpaths=True)
    entry = expect(Counted, store.apply(Incr("n", 2), deque())[0]).entry
    assert store._counters is not None
    worker = Counters(store._counters_fd)
    worker.add(entry, key_digest("n"), 40)
    reply, _ = store.apply(request_, deque())
    assert type(reply) is Ok
    assert worker.add(entry, key_digest("n"), 1) is None, "the worker must ask the services"
    if then is None:
        assert expect(Ok, store.apply(Has("n"), deque())[0]).value is False
    else:
        assert get(store, "n") == (then, True)
