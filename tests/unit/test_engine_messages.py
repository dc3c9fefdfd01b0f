"""The engine's pipe messages: framed as plain tuples, rebuilt as their classes."""

from __future__ import annotations

import inspect
import os
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from executor.engine import messages
from executor.engine.framing import PipeFrameReader
from executor.engine.messages import (
    Ack,
    Blocked,
    Done,
    EventsUsed,
    Message,
    Returned,
    RunTask,
    Stop,
    Unblocked,
)
from executor.engine.worker import _Inbox

FRAMERS: dict[type[Message], Callable[..., bytes]] = {
    RunTask: messages.frame_run_task,
    Ack: messages.frame_ack,
    Stop: messages.frame_stop,
    Done: messages.frame_done,
    Blocked: messages.frame_blocked,
    Unblocked: messages.frame_unblocked,
    Returned: messages.frame_returned,
    EventsUsed: messages.frame_events_used,
}
FROM_MANAGER = (RunTask, Ack, Stop)
ERROR = {"type": "ValueError", "message": "no", "traceback": "Traceback ...\n"}
SAMPLES: list[Message] = [
    RunTask("t-1", 2, "pkg.tasks:f", {"n": 3, "s": "x"}, {"up": '{"a": 1}', "gone": None}, 7, True),
    RunTask("t-2", 1, "pkg.tasks:g", {}, {}, 0, False),
    Ack(),
    Stop(),
    Done(True, "t-1", 2, True, '{"result": [1, 2]}', 1_700_000_000.25, 1_700_000_000.5),
    Done(False, "t-1", 3, False, ERROR, 1.0, 2.0),
    Blocked("ready.topic", False),
    Blocked("ready.topic", True),
    Unblocked(),
    Returned(["t-3", "t-4"]),
    EventsUsed(),
]


def _decode(message: Message) -> Callable[[Any], Message]:
    return messages.from_manager if isinstance(message, FROM_MANAGER) else messages.from_worker


@pytest.mark.parametrize("message", SAMPLES, ids=repr)
def test_a_message_survives_the_framing_round_trip_with_its_fields(message: Message) -> None:
    data = FRAMERS[type(message)](*message)
    (raw,) = PipeFrameReader().feed(data)
    assert type(raw) is tuple  # on the wire: a plain tuple, no reference to the class
    assert b"messages" not in data
    rebuilt = _decode(message)(raw)
    assert type(rebuilt) is type(message)
    assert rebuilt._asdict() == message._asdict()
    assert rebuilt == message


@pytest.mark.parametrize("cls", FRAMERS, ids=lambda cls: cls.__name__)
def test_a_framer_takes_the_parameters_of_its_class(cls: type[Message]) -> None:
    framer = FRAMERS[cls]
    assert list(inspect.signature(framer).parameters) == list(cls._fields)
    assert inspect.signature(framer).parameters["kind"].default == cls._field_defaults["kind"]
    sample = next(m for m in SAMPLES if type(m) is cls)
    by_name = framer(**{k: v for k, v in sample._asdict().items() if k != "kind"})
    assert by_name == framer(*sample)
    assert pickle.loads(by_name[4:]) == tuple(sample)


def test_every_kind_is_distinct() -> None:
    kinds = [cls._field_defaults["kind"] for cls in FRAMERS]
    assert len(set(kinds)) == len(kinds) == 8


@pytest.mark.parametrize(
    ("decode", "raw"),
    [
        (messages.from_worker, tuple(RunTask("t", 1, "m:f", {}, {}, 0, False))),  # wrong pipe
        (messages.from_worker, tuple(Ack())),
        (messages.from_manager, tuple(Done(False, "t", 1, True, "1", 0.0, 0.0))),
        (messages.from_manager, tuple(Returned(["t"]))),
        (messages.from_manager, (99,)),  # unknown kind
        (messages.from_worker, ()),
        (messages.from_manager, None),  # the stop message of old
        (messages.from_manager, "ack"),  # and the old ack
        (messages.from_worker, {"kind": 0}),
    ],
)
def test_a_message_of_another_kind_is_refused(decode: Callable[[Any], Message], raw: Any) -> None:
    with pytest.raises(ValueError, match="^not a message from (a worker|the manager): "):
        decode(raw)


def test_the_worker_inbox_puts_messages_back_as_they_were() -> None:
    a, b = SAMPLES[:2]
    assert isinstance(a, RunTask) and isinstance(b, RunTask)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"".join(FRAMERS[type(m)](*m) for m in (a, b, Ack(), Stop())))
        inbox = _Inbox(read_end)
        returned = inbox.until_ack()  # the Ack is consumed
        assert returned == [a, b] and [type(m) for m in returned] == [RunTask, RunTask]
        inbox.put_back(returned)
        again = [inbox.next(), inbox.next(), inbox.next()]
        assert again == [a, b, Stop()] and [type(m) for m in again] == [RunTask, RunTask, Stop]
    finally:
        os.close(read_end)
        os.close(write_end)
