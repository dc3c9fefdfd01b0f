"""The services' typed messages (executor/services/protocol.py) through the wire's framing."""

from __future__ import annotations

import pickle
import socket
from typing import Any

import pytest

from executor.services import protocol
from executor.services.protocol import (
    Cas,
    Counted,
    Err,
    Event,
    Get,
    Got,
    MemfdRef,
    Message,
    Ok,
    Publish,
    Put,
    Tables,
    Wait,
    typed,
)
from executor.services.wire import ServiceError, SocketFrameReader, pack

REF = MemfdRef("pickle", 1 << 20, (1000, (1 << 20) - 1000), 3)
EVERY_KIND: list[Message] = [
    protocol.PING,
    protocol.SHARE_TABLES,
    Get("k"),
    protocol.Set("k", b"v"),
    Put("k", REF),
    protocol.Delete("k"),
    protocol.Has("k"),
    protocol.KEYS,
    protocol.Incr("k", -3),
    Cas("k", None, b"new"),
    Publish("t", b"p", True),
    Wait("t", 2.5),
    protocol.UNWAIT,
    protocol.Subscribe("t"),
    protocol.Unsubscribe(7),
    protocol.ASK_BOARD,
    Ok(["a", "b"]),
    Got(REF, 12, True),
    Counted(5, -1),
    Tables(1 << 19, 1 << 19, False),
    Err("KeyError", "k"),
    protocol.PENDING,
    protocol.TIMEOUT,
    Event(4, None),
    protocol.SPARE,
]


def through_the_wire(*messages: Message) -> list[Message]:
    """The messages as a SocketFrameReader reads them from a socket."""
    left, right = socket.socketpair()
    reader = SocketFrameReader()
    try:
        left.sendall(b"".join(pack(msg, 0) for msg in messages))
        left.close()
        got: list[Message] = []
        while reader.fill(right):
            while (frame := reader.next()) is not None:
                got.append(frame[0])
        return got
    finally:
        reader.close()
        right.close()


def test_every_kind_arrives_as_its_own_class_with_its_fields() -> None:
    got = through_the_wire(*EVERY_KIND)
    assert got == EVERY_KIND
    assert [type(msg) for msg in got] == [type(msg) for msg in EVERY_KIND]
    assert {msg.tag for msg in EVERY_KIND} == set(protocol._KINDS), "every kind is listed"
    got_reply = got[EVERY_KIND.index(Got(REF, 12, True))]
    assert isinstance(got_reply, Got) and got_reply.enc == REF and got_reply.version == 12


def test_a_message_travels_as_a_plain_tuple() -> None:
    frame = pack(Publish("t", b"p", False), 0)
    assert b"protocol" not in frame and b"Publish" not in frame, "no class reference"
    assert pickle.loads(frame[5:]) == ("t", b"p", False, "pub")
    assert type(pickle.loads(frame[5:])) is tuple


@pytest.mark.parametrize(
    "raw",
    [(), ("k", "no such kind"), ("k", "extra", "get"), ("get",), "get", (1, 2, None)],
    ids=["empty", "unknown tag", "a field too many", "a field too few", "not a tuple", "no tag"],
)
def test_anything_else_is_refused(raw: Any) -> None:
    with pytest.raises(ValueError):
        typed(raw)
    left, right = socket.socketpair()
    reader = SocketFrameReader()
    try:
        body = pickle.dumps(raw, protocol=5)
        left.sendall(len(body).to_bytes(4, "little") + b"\0" + body)
        assert reader.fill(right)
        with pytest.raises(ServiceError, match="protocol error"):
            reader.next()
    finally:
        reader.close()
        left.close()
        right.close()
