"""StoreTable (the store's data in the services process) and the value codec, in-process."""

from __future__ import annotations

import fcntl
import os
import pickle
from collections import OrderedDict, deque
from typing import Any

import pytest

from executor.services.memfd_values import HEADER, SPARES_MAX_BYTES, Spares
from executor.services.protocol import (
    KEYS,
    SHARE_TABLES,
    Cas,
    Counted,
    Delete,
    Get,
    Got,
    Has,
    Incr,
    Ok,
    Request,
    Set,
    Tables,
)
from executor.services.store import StoreTable
from executor.services.wire import BIG_VALUE, Blob, decode, encode, expect, same_value


def request(table: StoreTable, msg: Request, blobs: tuple[Blob, ...] = ()) -> Any:
    """Apply one request as the server does; return the decoded result."""
    fds = deque(os.dup(b.fd) for b in blobs if b.fd >= 0)
    for blob in blobs:
        blob.close()
    reply, sent = table.apply(msg, fds)
    assert not fds, "every descriptor of a request is consumed"
    if isinstance(reply, Got):
        if reply.enc is None:
            return None
        assert reply.version >= 1, "a stored key's bucket has been changed at least once"
        return decode(sent[0])
    assert isinstance(reply, Ok | Counted)
    return reply.value


def put(table: StoreTable, key: str, value: Any) -> None:
    blob = encode(value)
    request(table, Set(key, blob.enc), blobs=(blob,))


@pytest.fixture
def table() -> StoreTable:
    return StoreTable(fastpaths=True)


def test_set_get_delete_contains_keys(table: StoreTable) -> None:
    put(table, "a", {"x": [1, 2]})
    put(table, "b", None)
    assert request(table, Get("a")) == {"x": [1, 2]}
    assert request(table, Get("b")) is None
    assert request(table, Has("b")) is True
    assert request(table, KEYS) == ["a", "b"]
    request(table, Delete("a"))
    assert request(table, Has("a")) is False
    assert request(table, KEYS) == ["b"]


def test_missing_keys(table: StoreTable) -> None:
    with pytest.raises(KeyError):
        table.apply(Delete("nope"), deque())
    reply, blobs = table.apply(Get("nope"), deque())
    assert type(reply) is Got and reply.enc is None and blobs == []


def versions_of(table: StoreTable, *keys: str) -> list[int]:
    return [expect(Got, table.apply(Get(key), deque())[0]).version for key in keys]


def test_every_change_bumps_the_version_of_the_key_and_reads_do_not(table: StoreTable) -> None:
    seen = [versions_of(table, "k", "other")]
    put(table, "k", 1)
    seen.append(versions_of(table, "k", "other"))
    request(table, Incr("k", 1))
    seen.append(versions_of(table, "k", "other"))
    assert cas(table, "k", 2, 3)
    assert not cas(table, "k", 2, 4), "a failed cas changes nothing"
    seen.append(versions_of(table, "k", "other"))
    request(table, Delete("k"))
    seen.append(versions_of(table, "k", "other"))
    request(table, Has("k"))
    request(table, KEYS)
    seen.append(versions_of(table, "k", "other"))
    assert [v[0] for v in seen] == [0, 1, 2, 3, 4, 4]
    assert {v[1] for v in seen} == {0}, "another bucket is untouched"


def test_non_str_keys_are_refused(table: StoreTable) -> None:
    with pytest.raises(TypeError, match="str, not int"):
        table.apply(Has(1), deque())  # type: ignore[arg-type]


def test_incr_counts_a_missing_key_as_zero_and_refuses_non_ints(table: StoreTable) -> None:
    assert request(table, Incr("n", 1)) == 1
    assert request(table, Incr("n", 41)) == 42
    assert request(table, Incr("n", -2)) == 40
    put(table, "s", "text")
    with pytest.raises(TypeError, match="holds str, not int"):
        table.apply(Incr("s", 1), deque())
    put(table, "flag", True)
    with pytest.raises(TypeError, match="holds bool"):
        table.apply(Incr("flag", 1), deque())


def cas(table: StoreTable, key: str, expected: Any, new: Any) -> bool:
    old = None if expected is None else encode(expected)
    blob = encode(new)
    blobs = (blob,) if old is None else (old, blob)
    return bool(request(table, Cas(key, None if old is None else old.enc, blob.enc), blobs))


def test_cas_none_matches_only_a_missing_key(table: StoreTable) -> None:
    assert cas(table, "k", None, "first")
    assert not cas(table, "k", None, "second")
    put(table, "n", None)
    assert not cas(table, "n", None, 1), "a stored None is not a missing key"
    assert request(table, Get("k")) == "first"


def test_cas_compares_values_not_pickles(table: StoreTable) -> None:
    put(table, "d", {"a": 1, "b": 2})
    assert cas(table, "d", OrderedDict([("b", 2), ("a", 1)]), "swapped")
    put(table, "i", 1)
    assert cas(table, "i", 1.0, 2)
    assert not cas(table, "i", 3, 4)
    assert request(table, Get("i")) == 2


def test_cas_on_big_values(table: StoreTable) -> None:
    big = os.urandom(BIG_VALUE * 4)
    put(table, "b", big)
    assert not cas(table, "b", big[:-1] + b"!", "no")
    assert cas(table, "b", big, "yes")
    assert request(table, Get("b")) == "yes"


@pytest.mark.parametrize(
    "value",
    [
        b"x" * BIG_VALUE,
        bytearray(b"y" * (2 * BIG_VALUE)),
        {"nested": [b"z" * BIG_VALUE, {"deep": bytearray(3)}]},
        pickle.PickleBuffer(bytearray(b"q" * BIG_VALUE)),
    ],
    ids=["bytes", "bytearray", "nested", "out-of-band"],
)
def test_big_values_travel_in_a_sealed_memfd_and_keep_their_type(value: Any) -> None:
    blob = encode(value)
    try:
        assert blob.fd >= 0
        seals = fcntl.fcntl(blob.fd, fcntl.F_GET_SEALS)
        assert seals & fcntl.F_SEAL_WRITE
        with pytest.raises(PermissionError):
            os.pwrite(blob.fd, b"!", 0)
        got = decode(blob)
    finally:
        blob.close()
    if isinstance(value, pickle.PickleBuffer):
        assert bytes(got) == bytes(value.raw())
    else:
        assert type(got) is type(value)
        assert got == value


class Tag(bytes):
    """A bytes subclass: must not lose its class on the raw-bytes fast path."""


def test_small_values_stay_inline_and_subclasses_keep_their_class() -> None:
    assert encode(b"x" * (BIG_VALUE - 100)).fd == -1
    blob = encode(Tag(b"t" * BIG_VALUE))
    try:
        assert type(decode(blob)) is Tag
    finally:
        blob.close()


UNLOADABLE = pickle.dumps(1)[:2] + b"\x8c\x03nox\x94\x8c\x01Y\x94\x93\x94."
"""A pickle of the global `nox.Y`: that module does not exist where values are compared."""


def test_same_value_falls_back_to_bytes_when_a_value_cannot_load() -> None:
    with pytest.raises(ModuleNotFoundError):
        decode(Blob(UNLOADABLE))
    assert same_value(Blob(UNLOADABLE), Blob(UNLOADABLE))
    assert not same_value(Blob(UNLOADABLE), Blob(pickle.dumps(1)))


def put_recyclable(table: StoreTable, key: str, value: bytes, spares: Spares) -> None:
    blob = encode(value, spares)
    request(table, Set(key, blob.enc), blobs=(blob,))


@pytest.mark.parametrize(
    ("size", "spare"),
    [(BIG_VALUE, True), (SPARES_MAX_BYTES - HEADER, True), (SPARES_MAX_BYTES, False)],
    ids=["small", "largest recycled", "too big to recycle"],
)
def test_a_replaced_store_value_becomes_a_spare_for_its_sender(
    table: StoreTable, size: int, spare: bool
) -> None:
    spares = Spares(refill=lambda: None)
    try:
        put_recyclable(table, "k", b"a" * size, spares)
        inode = os.fstat(table._data["k"].fd).st_ino
        put_recyclable(table, "k", b"b" * BIG_VALUE, spares)
        assert [os.fstat(blob.fd).st_ino for blob in table.freed] == ([inode] if spare else [])
        assert table.has_retired is not spare
    finally:
        spares.close()
        table.close()


def test_replaced_big_values_are_released_when_the_loop_is_idle(table: StoreTable) -> None:
    put(table, "k", b"a" * BIG_VALUE)
    held = table._data["k"].fd
    put(table, "k", "small now")
    assert table.has_retired
    os.fstat(held)  # still open: releasing waits for an idle moment
    table.release_retired()
    assert not table.has_retired
    with pytest.raises(OSError):
        os.fstat(held)


@pytest.mark.parametrize("fastpaths", [True, False], ids=["on", "off"])
def test_the_tables_answer_tells_clients_which_fast_paths_to_use(fastpaths: bool) -> None:
    table = StoreTable(fastpaths=fastpaths)
    try:
        reply, blobs = table.apply(SHARE_TABLES, deque())
        tables = expect(Tables, reply)
        assert tables.recycling is fastpaths
        assert (tables.counters_size > 0) is fastpaths
        assert len(blobs) == (2 if fastpaths else 1), "the versions, then the counters"
    finally:
        table.close()


def test_without_fast_paths_incr_and_replaced_values_stay_in_the_services() -> None:
    table = StoreTable(fastpaths=False)
    spares = Spares(refill=lambda: None)
    try:
        assert expect(Counted, table.apply(Incr("n", 1), deque())[0]) == Counted(1, -1)
        assert expect(Counted, table.apply(Incr("n", 1), deque())[0]) == Counted(2, -1)
        put_recyclable(table, "k", b"a" * BIG_VALUE, spares)  # as a client that recycles
        put_recyclable(table, "k", b"b" * BIG_VALUE, spares)
        assert table.freed == [], "no spare goes back to the sender"
        assert table.has_retired
    finally:
        spares.close()
        table.close()
