"""The worker process: started once per run, imports the pipeline code once, then runs
one task at a time as the manager sends them.

Messages (executor/framing.py: pickle protocol 5 on raw pipes, one hop each way):

    manager -> worker   (task_id, attempt, call, args, upstream_json) | None (stop)
    worker -> manager   (DONE, task_id, attempt, ok, payload, started, finished)
                        (BLOCKED, topic, timed) | (UNBLOCKED,)   from ctx.events

On success ``payload`` is the result as JSON text (checked here, so a result that is not
JSON-serializable fails the attempt with a TypeError); on failure it is the error dict
``{type, message, traceback}``. A worker never lets a task's exception escape.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from executor import _wire
from executor.capture import flush_std_streams, install_log_capture, redirect_std_streams
from executor.context import TaskContext
from executor.events import Events
from executor.framing import FrameReader, frame, read_message, write_frame
from executor.pipeline import import_call
from executor.store import Store

DONE, BLOCKED, UNBLOCKED = 0, 1, 2
HIDDEN_VARIABLES = ("EXECUTOR_TOKEN",)
_PR_SET_PDEATHSIG = 1
# json.dumps(allow_nan=False) would build a new encoder for every result.
_RESULT_ENCODER = json.JSONEncoder(allow_nan=False)

TaskMessage = tuple[str, int, str, dict[str, Any], dict[str, str | None]]


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
    out: Connection
    err: Connection
    log: Connection
    """Write ends of the stdout, stderr and log capture pipes."""


def worker_main(boot: WorkerBoot) -> None:
    """Entry point of a worker process."""
    _become_group_leader()
    redirect_std_streams(boot.out.fileno(), boot.err.fileno())
    stdout, stderr = sys.stdout, sys.stderr
    logger = install_log_capture(boot.log.fileno())
    for name in HIDDEN_VARIABLES:
        os.environ.pop(name, None)
    sys.path.insert(0, boot.root)
    send = _sender(boot.results)
    store, events = _connect_services(boot.services_address, send)
    functions = _import_calls(boot.calls)
    flush_std_streams()
    tasks_fd, reader = boot.tasks.fileno(), FrameReader()
    pending: list[TaskMessage | None] = []
    while True:
        message: TaskMessage | None = read_message(tasks_fd, reader, pending)
        if message is None:
            return
        task_id, attempt, call, args, upstream = message
        ctx = TaskContext(
            task_id=task_id,
            attempt=attempt,
            run_id=boot.run_id,
            node_id=boot.node_id,
            upstream={k: None if v is None else json.loads(v) for k, v in upstream.items()},
            store=store,
            events=events,
            log=logger,
        )
        outcome = run_task(functions[call], ctx, args)
        sys.stdout, sys.stderr = stdout, stderr  # a task that swapped them is undone
        send((DONE, task_id, attempt, *outcome))


def run_task(
    fn: Callable[..., Any] | BaseException, ctx: TaskContext, args: dict[str, Any]
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
        return _RESULT_ENCODER.encode(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"the task's return value is not JSON-serializable: {exc}") from None


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


def _sender(results: Connection) -> Callable[[tuple[Any, ...]], None]:
    # Block notices may come from a task's own threads: one message at a time on the pipe.
    lock = threading.Lock()
    fd = results.fileno()

    def send(message: tuple[Any, ...]) -> None:
        data = frame(message)
        with lock:
            write_frame(fd, data)

    return send


class _TaskEvents(Events):
    """``ctx.events`` in a worker. A wait with a timeout ends by itself, so the block
    notice says whether there is one: only untimed waits can deadlock a run."""

    timed = False

    def wait(self, topic: str, timeout: float | None = None) -> Any:
        self.timed = timeout is not None
        try:
            return super().wait(topic, timeout)
        finally:
            self.timed = False


def _connect_services(
    address: str, send: Callable[[tuple[Any, ...]], None]
) -> tuple[Store, _TaskEvents]:
    # As executor.services.connect(), with the events client above on the connection.
    connection = _wire.Connection(address)
    events = _TaskEvents(connection)
    events.set_block_hooks(
        lambda topic: send((BLOCKED, topic, events.timed)), lambda: send((UNBLOCKED,))
    )
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
