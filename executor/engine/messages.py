"""The messages on a worker's task and results pipes (executor/engine/pool.py), a typed
class for each kind.

    manager --> worker   RunTask(task_id, attempt, call, args, upstream, slot, spin)
                         Ack()                  answers Blocked and EventsUsed
                         Stop()                 exit (sent to an idle worker)
    worker --> manager   Done(unread, task_id, attempt, ok, payload, started, finished)
                         Blocked(topic, timed)  a task's thread is about to wait in ctx.events
                         Unblocked()            ... and is done waiting
                         Returned(task_ids)     tasks queued behind a blocked one, given back
                         EventsUsed()           a task uses ctx.events for the first time here

On the wire a message is the plain tuple of its fields, ``kind`` last: the sender frames it
with its class's framer (``frame_done(...)`` takes the parameters of ``Done(...)``) and the
receiver rebuilds the class by kind (``from_worker``, ``from_manager``). Why not pickle the
classes: this is the path that sets the time between two tasks, and a pickled NamedTuple
names its class in every frame and goes through Python-level reduce and construct calls at
both ends, several times the cost of a plain tuple, whereas framing the plain tuple costs
what the untyped tuples did and the rebuild is one tuple.__new__ call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple, ParamSpec, cast

from executor.engine.framing import frame

_P = ParamSpec("_P")


class RunTask(NamedTuple):
    """Manager -> worker: run this attempt now, or after the ones queued before it."""

    task_id: str
    attempt: int
    call: str
    """The task's ``module:function``."""
    args: Mapping[str, Any]
    upstream: dict[str, str | None]
    """Upstream task id -> its result as JSON text (None: no result)."""
    slot: int
    """The capture slot for its output (executor/engine/capture.py)."""
    spin: bool
    """Whether to look for the next message without sleeping first (contention.SPIN_S)."""
    kind: Literal[5] = 5


class Ack(NamedTuple):
    """Manager -> worker: answers Blocked and EventsUsed (the messages before it are all
    that the manager had sent by then)."""

    kind: Literal[6] = 6


class Stop(NamedTuple):
    """Manager -> worker: exit (sent only to an idle worker)."""

    kind: Literal[7] = 7


class Done(NamedTuple):
    """Worker -> manager: an attempt ended."""

    unread: bool
    """Whether its capture slot's pipes still held bytes when it ended."""
    task_id: str
    attempt: int
    ok: bool
    payload: Any
    """On success the result as JSON text (checked in the worker, so a result that is not
    JSON-serializable fails the attempt with a TypeError); on failure the error dict
    ``{type, message, traceback}``."""
    started: float
    finished: float
    kind: Literal[0] = 0


class Blocked(NamedTuple):
    """Worker -> manager: a task's thread is about to wait in ctx.events (answered by Ack)."""

    topic: str
    timed: bool
    """A wait with a timeout ends by itself: only untimed ones can deadlock a run."""
    kind: Literal[1] = 1


class Unblocked(NamedTuple):
    """Worker -> manager: that wait is over."""

    kind: Literal[2] = 2


class Returned(NamedTuple):
    """Worker -> manager: tasks that were queued behind a blocked one, given back unstarted."""

    task_ids: list[str]
    kind: Literal[3] = 3


class EventsUsed(NamedTuple):
    """Worker -> manager: a task uses ctx.events for the first time in this worker
    (answered by Ack once the lifecycle events are published)."""

    kind: Literal[4] = 4


FromManager = RunTask | Ack | Stop
FromWorker = Done | Blocked | Unblocked | Returned | EventsUsed
Message = FromManager | FromWorker


def _framer(cls: Callable[_P, Message]) -> Callable[_P, bytes]:
    """A function with the parameters of ``cls`` that returns ``frame(tuple(cls(...)))``
    without building the instance on the way.

    Its source is generated, as collections.namedtuple generates ``__new__``: a function
    taking ``*args, **kwargs`` would cost more per call than the instance it saves.
    """
    namedtuple = cast(type[Message], cls)
    fields = namedtuple._fields
    params = [*fields[:-1], f"kind={namedtuple._field_defaults['kind']!r}"]
    name = f"frame_{namedtuple.__name__}"
    source = f"def {name}({', '.join(params)}):\n    return frame(({', '.join(fields)},))\n"
    namespace: dict[str, Any] = {"frame": frame}
    exec(source, namespace)
    framed: Callable[_P, bytes] = namespace[name]
    framed.__module__ = __name__
    framed.__doc__ = f"The frame of a {namedtuple.__name__} message."
    return framed


frame_run_task = _framer(RunTask)
frame_ack = _framer(Ack)
frame_stop = _framer(Stop)
frame_done = _framer(Done)
frame_blocked = _framer(Blocked)
frame_unblocked = _framer(Unblocked)
frame_returned = _framer(Returned)
frame_events_used = _framer(EventsUsed)

_rebuild = cast(Callable[[type[Any], Any], Any], tuple.__new__)


def _decoder(classes: tuple[type[Message], ...], sender: str) -> Callable[[Any], Any]:
    # The length is not checked: both ends of a pipe run this module.
    by_kind = {cls._field_defaults["kind"]: cls for cls in classes}

    def decode(raw: Any) -> Any:
        try:
            return _rebuild(by_kind[raw[-1]], raw)
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"not a message from {sender}: {raw!r}") from None

    return decode


from_manager: Callable[[Any], FromManager] = _decoder((RunTask, Ack, Stop), "the manager")
"""A message read from a task pipe (a plain tuple) as its class; ValueError if it is none."""
from_worker: Callable[[Any], FromWorker] = _decoder(
    (Done, Blocked, Unblocked, Returned, EventsUsed), "a worker"
)
"""A message read from a results pipe (a plain tuple) as its class; ValueError if it is none."""
