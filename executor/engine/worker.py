"""The worker process: started once per run, it imports the pipeline code once (not once
per task), then runs the tasks the manager sends it (executor/engine/messages.py) one at a
time, and never lets a task's exception escape. The manager may queue up to QUEUE_DEPTH
more behind the running one (executor/engine/pool.py; "prefetch" in executor/engine/manager.py),
each with a capture slot of its own (executor/engine/capture.py, CaptureSlots), so the
worker starts the next task without waiting for the manager.

Before a task blocks in ctx.events, the worker reports Blocked and reads its pipe up to
the manager's Ack: tasks queued behind the blocked one are given back (Returned), since
they may be the very tasks that would publish the awaited event.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from executor import jsontext
from executor.contention import SPIN_S, spin_poll
from executor.context import TaskContext
from executor.engine.capture import CaptureSlots, flush_std_streams
from executor.engine.framing import PipeFrameReader, read_message, write_frame
from executor.engine.malloc import keep_freed_memory
from executor.engine.messages import (
    Ack,
    FromManager,
    RunTask,
    Stop,
    frame_blocked,
    frame_done,
    frame_events_used,
    frame_returned,
    frame_unblocked,
    from_manager,
)
from executor.pipeline import import_call
from executor.services import wire
from executor.services.events import Events, Subscription
from executor.services.store import Store

HIDDEN_VARIABLES = ("EXECUTOR_TOKEN",)
_PR_SET_PDEATHSIG = 1
# json.dumps(allow_nan=False) would build a new encoder for every result.
_RESULT_ENCODER = json.JSONEncoder(allow_nan=False)
_UNBLOCKED = frame_unblocked()
_EVENTS_USED = frame_events_used()


@dataclass(frozen=True)
class WorkerBoot:
    """Everything a worker needs; picklable (Connections pass as fds under forkserver)."""

    root: str
    calls: tuple[str, ...]
    run_id: str
    node_id: str
    services_address: str
    tasks: Connection
    """Read end: task messages from the manager."""
    results: Connection
    """Write end: results and block notices to the manager."""
    capture: tuple[tuple[Connection, Connection, Connection], ...]
    """Write ends of the (stdout, stderr, log) capture pipes of each capture slot."""


def worker_main(boot: WorkerBoot) -> None:
    """Entry point of a worker process."""
    _become_group_leader()
    keep_freed_memory()
    slots = CaptureSlots(
        tuple((out.fileno(), err.fileno(), log.fileno()) for out, err, log in boot.capture)
    )
    stdout, stderr = sys.stdout, sys.stderr
    for name in HIDDEN_VARIABLES:
        os.environ.pop(name, None)
    sys.path.insert(0, boot.root)
    send = _sender(boot.results)
    inbox = _Inbox(boot.tasks.fileno())
    store, events = _connect_services(boot.services_address, send, inbox)
    functions = _import_calls(boot.calls)
    flush_std_streams()
    logger = slots.logger
    spin_s = 0.0
    while True:
        task = inbox.next(spin_s)
        if not isinstance(task, RunTask):
            if isinstance(task, Stop):
                return
            continue  # an Ack that answers a block notice from a thread that outlived its task
        spin_s = SPIN_S if task.spin else 0.0
        slot = task.slot
        slots.use(slot)
        ctx = TaskContext(
            task_id=task.task_id,
            attempt=task.attempt,
            run_id=boot.run_id,
            node_id=boot.node_id,
            upstream={k: None if v is None else json.loads(v) for k, v in task.upstream.items()},
            store=store,
            events=events,
            log=logger,
        )
        inbox.in_task = True
        outcome = run_task(functions[task.call], ctx, task.args)
        inbox.in_task = False
        sys.stdout, sys.stderr = stdout, stderr  # a task that swapped them is undone
        with suppress(wire.ServiceError):  # gone or busy: see Store.settle
            store.settle()  # later tasks must see this one's writes
        send(frame_done(slots.unread(slot), task.task_id, task.attempt, *outcome))


def run_task(
    fn: Callable[..., Any] | BaseException, ctx: TaskContext, args: Mapping[str, Any]
) -> tuple[bool, Any, float, float]:
    """Call ``fn(ctx, **args)``; return ``(ok, payload, started, finished)``, never raise."""
    started = time.time()
    try:
        if isinstance(fn, BaseException):
            raise fn
        value = fn(ctx, **args)
        finished = time.time()
        payload: Any = _result_json(value)
        ok = True
    except BaseException as exc:  # SystemExit too: a task cannot stop its worker this way
        finished = time.time()
        payload = error_dict(exc)
        ok = False
        _report_traceback(payload["traceback"])
    flush_std_streams()
    return ok, payload, started, finished


def _report_traceback(text: str) -> None:
    """Also show a failed task's traceback in its err stream (fd 2: the task may have
    replaced or closed sys.stderr)."""
    with suppress(OSError, ValueError):
        sys.stderr.flush()
    with suppress(OSError):
        write_frame(2, text.encode("utf-8", "backslashreplace"))


def error_dict(exc: BaseException) -> dict[str, Any]:
    """The results-file form of an exception, remote traceback included."""
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails still has a type
        message = f"<{type(exc).__name__} with an unprintable message>"
    return {
        "type": type(exc).__name__,
        "message": message,
        # Leave out run_task's own frame: the traceback starts in the task's code.
        "traceback": "".join(
            traceback.format_exception(type(exc), exc, _skip_first_frame(exc.__traceback__))
        ),
    }


def _skip_first_frame(tb: TracebackType | None) -> TracebackType | None:
    if tb is not None and tb.tb_frame.f_code is run_task.__code__ and tb.tb_next is not None:
        return tb.tb_next
    return tb


def _result_json(value: Any) -> str:
    try:
        text: str = _RESULT_ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the task's return value is not JSON-serializable: {exc}") from None
    # Surrogates are escaped as \udXXX: lone ones would break strict readers (executor.jsontext).
    return jsontext.rescrub(text) if "\\ud" in text else text


def _become_group_leader() -> None:
    """Own process group (a timeout kills the task and its children), default signals,
    and die with the manager so that no worker outlives a killed run."""
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _sender(results: Connection) -> Callable[[bytes], None]:
    """Writes framed messages (executor/engine/messages.py) to the results pipe."""
    # Block notices may come from a task's own threads: one message at a time on the pipe.
    lock = threading.Lock()
    fd = results.fileno()

    def send(data: bytes) -> None:
        with lock:
            write_frame(fd, data)

    return send


class _TaskEvents(Events):
    """``ctx.events`` in a worker.

    - A wait with a timeout ends by itself, so the block notice says whether there is
      one: only untimed waits can deadlock a run.
    - The engine publishes its lifecycle events only once some task uses events (each
      publish costs the manager a message to the services process). The first use in
      this worker announces itself and waits for the manager's answer, by which time
      the latest lifecycle event of each topic has been published.
    """

    timed = False
    announced = False

    def __init__(self, connection: wire.Connection, announce: Callable[[], None]) -> None:
        super().__init__(connection)
        self._announce = announce

    def _first_use(self) -> None:
        if not self.announced:
            self.announced = True
            self._announce()

    def publish(self, topic: str, payload: Any = None) -> None:
        self._first_use()
        super().publish(topic, payload)

    def subscribe(self, topic: str) -> Subscription:
        self._first_use()
        return super().subscribe(topic)

    def wait(self, topic: str, timeout: float | None = None) -> Any:
        self._first_use()
        self.timed = timeout is not None
        try:
            return super().wait(topic, timeout)
        finally:
            self.timed = False


class _Inbox:
    """Messages from the manager, in order (frames read ahead are kept)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._reader = PipeFrameReader()
        self._pending: list[Any] = []
        """Messages read ahead, as they came off the pipe (plain tuples)."""
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.in_task = False
        """True while a task runs: only then may a hook read the pipe."""

    def next(self, spin_s: float = 0.0) -> FromManager:
        """The next message; when none is here, look without sleeping for up to
        ``spin_s`` seconds first (see SPIN_S)."""
        if spin_s and not self._pending:
            spin_poll(self._poll.poll, spin_s)
        return from_manager(read_message(self._fd, self._reader, self._pending))

    def until_ack(self) -> list[RunTask | Stop]:
        """The messages that arrive before the manager's Ack (which is consumed)."""
        messages = []
        while not isinstance(message := self.next(), Ack):
            messages.append(message)
        return messages

    def put_back(self, messages: Iterable[FromManager]) -> None:
        """Make ``messages`` the next ones again, in their order."""
        self._pending[:0] = [tuple(message) for message in messages]


def _connect_services(
    address: str, send: Callable[[bytes], None], inbox: _Inbox
) -> tuple[Store, _TaskEvents]:
    # As executor.services.server.connect(), with the events client above on the connection.
    connection = wire.Connection(address)

    def announce() -> None:
        send(_EVENTS_USED)
        if inbox.in_task:  # (else the main loop skips the Ack)
            inbox.put_back(inbox.until_ack())  # queued tasks stay queued

    events = _TaskEvents(connection, announce)

    def on_block(topic: str) -> None:
        send(frame_blocked(topic, events.timed))
        if inbox.in_task:
            returned = inbox.until_ack()  # tasks queued behind a blocked one go back
            if returned:
                send(frame_returned([m.task_id for m in returned if isinstance(m, RunTask)]))

    events.set_block_hooks(on_block, lambda: send(_UNBLOCKED))
    return Store(connection), events


def _import_calls(calls: tuple[str, ...]) -> dict[str, Callable[..., Any] | BaseException]:
    """Import every call once; a failure is kept and raised by each task that uses it."""
    functions: dict[str, Callable[..., Any] | BaseException] = {}
    for call in calls:
        try:
            functions[call] = import_call(call)
        except (Exception, SystemExit) as exc:
            functions[call] = exc
    return functions
