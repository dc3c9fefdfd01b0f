"""TopicBoard (the events' state in the services process), in-process."""

from __future__ import annotations

import pickle
from collections import deque
from typing import Any

import pytest

from executor.services.events import Delivery, TopicBoard
from executor.services.protocol import (
    UNWAIT,
    Event,
    Ok,
    Publish,
    Subscribe,
    Unsubscribe,
    Wait,
)
from executor.services.wire import encode, expect


def publish(
    board: TopicBoard, peer: str, topic: str, payload: Any, ack: bool = True
) -> list[Delivery]:
    blob = encode(payload)
    return board.apply(peer, Publish(topic, blob.enc, ack), deque(), 0.0)


def summary(deliveries: list[Delivery]) -> list[tuple[Any, ...]]:
    """(peer, tag, payload-or-fields) per delivery, payloads unpickled."""
    out: list[tuple[Any, ...]] = []
    for peer, msg, _ in deliveries:
        if type(msg) is Event:
            assert isinstance(msg.enc, bytes)
            out.append((peer, "ev", msg.sid, pickle.loads(msg.enc)))
        elif type(msg) is Ok and isinstance(msg.value, bytes):
            out.append((peer, "ok", pickle.loads(msg.value)))
        else:
            fields = msg._asdict()
            out.append((peer, fields.pop("tag"), *fields.values()))
    return out


@pytest.fixture
def board() -> TopicBoard:
    return TopicBoard()


def test_wait_is_latched_on_the_latest_payload(board: TopicBoard) -> None:
    publish(board, "p", "t", 1)
    publish(board, "p", "t", 2)
    assert summary(board.apply("w", Wait("t", None), deque(), 0.0)) == [("w", "ok", 2)]


def test_a_parked_wait_gets_the_next_publish_before_the_publisher_ack(board: TopicBoard) -> None:
    assert summary(board.apply("w", Wait("t", None), deque(), 0.0)) == [("w", "pending")]
    assert summary(publish(board, "p", "t", "go")) == [("w", "ok", "go"), ("p", "ok", None)]
    assert summary(publish(board, "p", "t", "again", ack=False)) == [], "a wait is answered once"


def test_waits_time_out_at_their_deadline(board: TopicBoard) -> None:
    board.apply("w1", Wait("t", 5.0), deque(), 100.0)
    board.apply("w2", Wait("t", None), deque(), 100.0)
    assert board.next_deadline() == 105.0
    assert board.expire(104.9) == []
    assert summary(board.expire(105.0)) == [("w1", "timeout")]
    assert summary(publish(board, "p", "t", 7, ack=False)) == [("w2", "ok", 7)]


def test_a_zero_timeout_polls_without_parking(board: TopicBoard) -> None:
    assert summary(board.apply("w", Wait("t", 0), deque(), 0.0)) == [("w", "timeout")]
    assert board.next_deadline() is None


def test_unwait_ends_a_parked_wait_and_is_ignored_otherwise(board: TopicBoard) -> None:
    board.apply("w", Wait("t", 30.0), deque(), 0.0)
    assert summary(board.apply("w", UNWAIT, deque(), 0.0)) == [("w", "timeout")]
    assert board.apply("w", UNWAIT, deque(), 0.0) == []
    assert board.expire(31.0) == [], "the cancelled wait's deadline is stale"


def test_subscriptions_get_only_later_payloads_in_order(board: TopicBoard) -> None:
    publish(board, "p", "t", "before")
    sid = expect(Ok, board.apply("s", Subscribe("t"), deque(), 0.0)[0][1]).value
    out = publish(board, "p", "t", "one", ack=False) + publish(board, "p", "t", "two", ack=False)
    assert summary(out) == [("s", "ev", sid, "one"), ("s", "ev", sid, "two")]
    board.apply("other", Unsubscribe(sid), deque(), 0.0)  # not the owner: no effect
    assert len(publish(board, "p", "t", 3, ack=False)) == 1
    ended = board.apply("s", Unsubscribe(sid), deque(), 0.0)
    assert ended == [("s", Event(sid, None), [])], "the end wakes a reader in another thread"
    assert publish(board, "p", "t", 4, ack=False) == []


def test_dropping_a_connection_forgets_its_waits_and_subscriptions(board: TopicBoard) -> None:
    board.apply("gone", Wait("t", None), deque(), 0.0)
    board.apply("gone", Subscribe("t"), deque(), 0.0)
    board.drop("gone")
    assert summary(publish(board, "p", "t", 1)) == [("p", "ok", None)]


def test_non_str_topics_are_refused(board: TopicBoard) -> None:
    with pytest.raises(TypeError, match="str, not bytes"):
        board.apply("w", Wait(b"t", None), deque(), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        board.apply("w", Subscribe(""), deque(), 0.0)
