"""The run's event system: `Events` (client, `ctx.events`) and `TopicBoard` (its state).

A topic is a str. `publish` records the topic's latest payload and hands it to every
parked `wait` and every open subscription. `wait` is latched: it returns the latest
payload at once if there is one, even when it was published before the wait began.
Topics starting with `executor.` are the engine's lifecycle events
(`executor.task.started|finished|failed|retried`): tasks may wait on and subscribe to
them, but not publish them. A parked wait gets a task's small payloads straight from the
publisher through the wait board (executor/services/board.py); the services process still
answers it as well, and stays the authority. With EXECUTOR_FASTPATHS=off the services
make no wait board, so every payload goes through them.

A task blocked in `wait` (or in a subscription) still holds its worker. Before it
blocks, the client calls the `on_block(topic)` hook and afterwards `on_unblock()`, so
the engine can notice a run where every worker is blocked and fail it instead of
hanging.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from executor.services.board import MAX_PAYLOAD, Board, ParkedWait
from executor.services.protocol import (
    ASK_BOARD,
    DONE,
    PENDING,
    TIMEOUT,
    Event,
    Message,
    Ok,
    Publish,
    Subscribe,
    Timeout,
    Unsubscribe,
    Unwait,
    Wait,
)
from executor.services.sharedmem import digest
from executor.services.wire import (
    Blob,
    Connection,
    ServiceError,
    decode,
    encode,
    expect,
    load,
    take,
)

RESERVED_PREFIX = "executor."
"""Topics of the engine's lifecycle events; only the engine's publisher may publish them."""

EVENT_REQUESTS: frozenset[type[Message]] = frozenset(
    {Publish, Wait, Unwait, Subscribe, Unsubscribe}
)
"""The requests a TopicBoard applies."""

Delivery = tuple[Hashable, Message, list[Blob]]
"""A message for one connection of the services process, with the values it carries."""


def _check_topic(topic: object) -> str:
    if type(topic) is not str:
        raise TypeError(f"event topics must be str, not {type(topic).__name__}")
    if not topic:
        raise ValueError("event topics must not be empty")
    return topic


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is not None and timeout < 0:
        raise ValueError("timeout must be None or >= 0")
    return timeout


def _ignore_block(topic: str) -> None:
    pass


def _ignore_unblock() -> None:
    pass


class Events:
    """Publish, wait for and subscribe to the run's events (`ctx.events`)."""

    def __init__(self, conn: Connection, *, engine: bool = False) -> None:
        self._conn = conn
        self._engine = engine  # the engine's publisher: reserved topics, publish never blocks
        self._on_block: Callable[[str], None] = _ignore_block
        self._on_unblock: Callable[[], None] = _ignore_unblock
        self._board: Board | None = None
        self._slot = -1
        self._board_asked = False

    def __reduce__(self) -> Any:
        raise TypeError("an Events client cannot be pickled: give workers the services address")

    def set_block_hooks(
        self, on_block: Callable[[str], None], on_unblock: Callable[[], None]
    ) -> None:
        """Call `on_block(topic)` right before blocking for an event, `on_unblock()` after."""
        self._on_block, self._on_unblock = on_block, on_unblock

    def publish(self, topic: str, payload: Any = None) -> None:
        """Make `payload` the latest on `topic` and deliver it to waiters and subscribers.

        In a task, the event is visible to every process when publish returns. The
        engine's publisher does not wait for the services process at all.
        """
        _check_topic(topic)
        if topic.startswith(RESERVED_PREFIX) and not self._engine:
            raise ValueError(
                f"topics starting with {RESERVED_PREFIX!r} are reserved for the executor"
            )
        blob = encode(payload)
        if self._engine:
            self._conn.cast(Publish(topic, blob.enc, False), [blob])
            return
        enc = blob.enc
        # Not after unanswered store writes: a waiter must see them when it wakes.
        if type(enc) is bytes and len(enc) <= MAX_PAYLOAD and not self._conn.unsettled:
            board = self._wait_board()
            if board is not None:
                board.hand_off(digest(topic), enc)
        # Sleep until the answer: a spinning publisher holds a CPU a woken waiter needs.
        self._conn.call(Publish(topic, enc, True), [blob], spin=False)

    def wait(self, topic: str, timeout: float | None = None) -> Any:
        """The latest payload on `topic`, blocking until there is one.

        Raises TimeoutError when `timeout` seconds pass first.
        """
        _check_topic(topic)
        reply, fds = self._conn.call(
            Wait(topic, _check_timeout(timeout)),
            on_block=lambda: self._on_block(topic),
            on_unblock=self._on_unblock,
            parked=self._parking(topic),
        )
        if type(reply) is Timeout:
            raise TimeoutError(f"no event on topic {topic!r} within {timeout} s")
        return load(expect(Ok, reply).value, fds)

    def _wait_board(self) -> Board | None:
        """The run's wait board (executor/services/board.py), asked for once; None without one."""
        if not self._board_asked:
            self._board_asked = True
            reply, fds = self._conn.call(ASK_BOARD)
            slot = int(expect(Ok, reply).value)
            if slot >= 0:
                fd = fds.popleft()
                try:
                    self._board, self._slot = Board(fd), slot
                except OSError:
                    pass  # cannot map it: every event goes the long way
                finally:
                    os.close(fd)
        return self._board

    def _parking(self, topic: str) -> ParkedWait | None:
        """How a wait on ``topic`` parks in this client's slot of the wait board."""
        board = self._wait_board()
        if board is None or self._slot in board.dead:
            return None
        return ParkedWait(board, self._slot, digest(topic))

    def subscribe(self, topic: str) -> Subscription:
        """A subscription to the payloads published on `topic` from now on."""
        reply, _ = self._conn.call(Subscribe(_check_topic(topic)))
        sid = int(expect(Ok, reply).value)
        self._conn.open_queue(sid)
        return Subscription(self, topic, sid)

    def close(self) -> None:
        """Close the connection (shared with this process's Store); flushes pending publishes."""
        self._conn.close()


class Subscription:
    """Payloads published on one topic after `subscribe` returned, in publish order.

    Iterating blocks for the next payload. The iteration ends (StopIteration) when the
    subscription is closed with `close()` (or by leaving its `with` block) or when the
    run's services stop. `get(timeout)` waits at most `timeout` seconds. Payloads that
    are not read yet wait in memory, so close a subscription you no longer read.
    """

    def __init__(self, events: Events, topic: str, sid: int) -> None:
        self._events = events
        self.topic = topic
        self._sid = sid
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        try:
            return self.get()
        except EOFError:
            raise StopIteration from None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, timeout: float | None = None) -> Any:
        """The next payload. TimeoutError after `timeout` s; EOFError once closed.

        Only an untimed read calls the block hooks: a timed one ends by itself, so it
        cannot be part of a deadlock.
        """
        events = self._events
        untimed = _check_timeout(timeout) is None
        blob = events._conn.next_event(
            self._sid,
            timeout,
            (lambda: events._on_block(self.topic)) if untimed else _ignore_unblock,
            events._on_unblock if untimed else _ignore_unblock,
        )
        if blob is None:
            raise TimeoutError(f"no event on topic {self.topic!r} within {timeout} s")
        try:
            return decode(blob)
        finally:
            blob.close()

    def close(self) -> None:
        """Stop receiving; idempotent. Pending payloads are dropped."""
        if self._closed:
            return
        self._closed = True
        conn = self._events._conn
        conn.close_queue(self._sid)
        try:
            conn.cast(Unsubscribe(self._sid))
        except ServiceError:
            pass  # the services (or this client) are gone: nothing to unsubscribe from


class TopicBoard:
    """Latest payloads, parked waits and subscriptions of one run (services process).

    Each method returns the deliveries it causes; the caller sends them.
    """

    def __init__(self) -> None:
        self._latest: dict[str, Blob] = {}
        self._parked: dict[str, dict[Hashable, int]] = {}  # topic -> waiter -> wait id
        self._waiting: dict[Hashable, tuple[str, int]] = {}  # waiter -> (topic, wait id)
        self._deadlines: list[tuple[float, int, Hashable]] = []
        self._subs: dict[str, dict[int, Hashable]] = {}  # topic -> sid -> subscriber
        self._sub_topic: dict[int, tuple[str, Hashable]] = {}
        self._ids = itertools.count(1)
        self.ended: list[Hashable] = []
        """Waiters whose parked wait was answered since the caller last cleared this."""

    def apply(self, peer: Hashable, msg: Message, fds: deque[int], now: float) -> list[Delivery]:
        """Apply one request of EVENT_REQUESTS; the deliveries it causes."""
        if type(msg) is Publish:
            return self._publish(peer, _check_topic(msg.topic), take(msg.enc, fds), msg.ack)
        if type(msg) is Wait:
            return self._wait(peer, _check_topic(msg.topic), msg.timeout, now)
        if type(msg) is Unwait:
            return self._unpark(peer)
        if type(msg) is Subscribe:
            return self._subscribe(peer, _check_topic(msg.topic))
        if type(msg) is Unsubscribe:
            return self._unsubscribe(peer, msg.sid)
        raise ValueError(f"not an events request: {msg.tag!r}")

    def parked(self, peer: Hashable) -> bool:
        """Whether ``peer`` has a wait parked."""
        return peer in self._waiting

    def next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def expire(self, now: float) -> list[Delivery]:
        """Time out the parked waits whose deadline passed."""
        out: list[Delivery] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, wait_id, peer = heapq.heappop(self._deadlines)
            if self._waiting.get(peer, ("", 0))[1] == wait_id:
                out += self._unpark(peer)
        return out

    def drop(self, peer: Hashable) -> None:
        """Forget a closed connection's waits and subscriptions."""
        self._unpark(peer)
        for sid in [sid for sid, (_, owner) in self._sub_topic.items() if owner == peer]:
            self._unsubscribe(peer, sid)

    def close(self) -> None:
        for blob in self._latest.values():
            blob.close()
        self._latest.clear()

    def _publish(self, peer: Hashable, topic: str, blob: Blob, ack: bool) -> list[Delivery]:
        old = self._latest.pop(topic, None)
        if old is not None:
            old.close()
        self._latest[topic] = blob
        out: list[Delivery] = []
        for waiter in self._parked.pop(topic, {}):
            del self._waiting[waiter]
            out.append((waiter, Ok(blob.enc), [blob]))
            self.ended.append(waiter)
        for sid, subscriber in self._subs.get(topic, {}).items():
            out.append((subscriber, Event(sid, blob.enc), [blob]))
        if ack:
            out.append((peer, DONE, []))
        return out

    def _wait(
        self, peer: Hashable, topic: str, timeout: float | None, now: float
    ) -> list[Delivery]:
        blob = self._latest.get(topic)
        if blob is not None:
            return [(peer, Ok(blob.enc), [blob])]
        if timeout is not None and timeout <= 0:
            return [(peer, TIMEOUT, [])]
        out = self._unpark(peer)  # a client has one wait at a time: end a stale one
        wait_id = next(self._ids)
        self._parked.setdefault(topic, {})[peer] = wait_id
        self._waiting[peer] = (topic, wait_id)
        if timeout is not None:
            heapq.heappush(self._deadlines, (now + timeout, wait_id, peer))
        return [*out, (peer, PENDING, [])]

    def _unpark(self, peer: Hashable) -> list[Delivery]:
        if peer not in self._waiting:
            return []
        topic, _ = self._waiting.pop(peer)
        del self._parked[topic][peer]
        if not self._parked[topic]:
            del self._parked[topic]
        self.ended.append(peer)
        return [(peer, TIMEOUT, [])]

    def _subscribe(self, peer: Hashable, topic: str) -> list[Delivery]:
        sid = next(self._ids)
        self._subs.setdefault(topic, {})[sid] = peer
        self._sub_topic[sid] = (topic, peer)
        return [(peer, Ok(sid), [])]

    def _unsubscribe(self, peer: Hashable, sid: int) -> list[Delivery]:
        topic, owner = self._sub_topic.get(sid, ("", None))
        if owner != peer:
            return []
        del self._sub_topic[sid]
        del self._subs[topic][sid]
        if not self._subs[topic]:
            del self._subs[topic]
        return [(peer, Event(sid, None), [])]  # wakes a reader blocked on it in another thread
