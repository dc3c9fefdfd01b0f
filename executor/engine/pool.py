"""Worker processes as the manager sees them: start, message, signal, reap.

Each worker gets a task pipe, a results pipe and CAPTURE_SLOTS capture slots of three pipes
each (stdout, stderr, log records): one for the running task, one per task queued
behind it. The manager keeps the write end of ``tasks`` and the read
ends of the others; its copies of the worker's ends are closed right after the start,
so a dead worker's pipes report end-of-file and nothing it wrote before dying is lost.
Every end the manager holds is non-blocking: it never waits on a worker (a batch of tasks
bigger than the pipe is written as the worker reads it, see PipeFrameWriter).

    manager                                   worker (own process group)
    tasks    ──RunTask | Ack | Stop────────►  fn(ctx, **args)
    results  ◄──Done | Blocked | ...───────   send
    slot 0..7 ◄── out, err, log bytes ──────  fd 1, fd 2, logging handler

The messages on the first two are in executor/engine/messages.py.
"""

from __future__ import annotations

import os
import resource
import signal
from collections import deque
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from executor.engine.combined_log import ERR, LOG, OUT, LineSplitter
from executor.engine.framing import PipeFrameReader, PipeFrameWriter
from executor.engine.worker import WorkerBoot, worker_main

STREAMS = (OUT, ERR, LOG)
CAPTURE_SLOTS = 8
QUEUE_DEPTH = CAPTURE_SLOTS - 1
"""How many tasks may wait in a worker behind the one it runs (measured on a wide DAG:
8 slots ran 10-25% more tasks per second than 4, 16 little more than 8)."""
_SPARE_DESCRIPTORS = 256  # the log, the services, epoll, and whatever the caller holds


def allow_descriptors(workers: int) -> None:
    """Raise this process's soft limit on open files (never above the hard limit) to
    what a pool of ``workers`` needs: the manager holds three pipes per capture slot of
    each worker, and a worker being started holds both ends of its own."""
    per_worker = CAPTURE_SLOTS * len(STREAMS) + 3  # + task pipe, results pipe, sentinel
    need = (workers + 1) * per_worker * 2 + _SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY:
        need = min(need, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class WorkerHandle:
    """One live worker process and its pipes, plus what it is running.

    ``streams[slot * 3 + i]`` is stream ``STREAMS[i]`` of capture slot ``slot``.
    """

    def __init__(
        self,
        process: BaseProcess,
        tasks: Connection,
        results: Connection,
        streams: list[Connection],
    ) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.death_fd = _death_fd(process)
        """Readable once the worker process has ended (a pidfd; else its sentinel)."""
        self.tasks = tasks
        self.writer = PipeFrameWriter(tasks.fileno())
        """Sends frames (executor/engine/framing.py) on ``tasks``."""
        self.results = results
        self.streams = streams
        self.splitters = [LineSplitter(STREAMS[i % 3]) for i in range(len(streams))]
        self.reader = PipeFrameReader()
        """Reassembles messages from the results pipe."""
        self.task: tuple[str, int] | None = None
        """(task_id, attempt) of the task it runs."""
        self.slot = 0
        """The capture slot of that task."""
        self.queued: deque[tuple[str, int, int]] = deque()
        """(task_id, attempt, slot) sent to run after it (prefetched)."""
        self.owners: list[str | None] = [None] * CAPTURE_SLOTS
        """Per capture slot, the task whose output it carries (the last one sent to it)."""
        self.free_slots = list(range(CAPTURE_SLOTS))
        """Capture slots no task of this worker is using: the last owner has ended and its
        output was read when that was reported, or it was given back unstarted."""
        self.waits = 0
        """How many of its threads wait in ctx.events (no prefetch meanwhile)."""
        self.blocked_topic: str | None = None
        """The topic of an untimed wait, while there is one (deadlock detection)."""
        self.kill_reason: dict[str, Any] | None = None
        """The error to record when the manager kills this worker on purpose."""
        self.dispatched_at = 0.0
        """When the current task was sent or promoted (the start of an attempt that crashes)."""
        self.retired = False
        """Set once the manager has reaped it and closed its pipes."""
        self.outbox: list[bytes] = []
        """Frames to send together: a write that wakes a sleeping worker costs tens of
        microseconds on a virtual machine, one per batch of tasks is enough."""

    def source(self, index: int) -> str:
        """The combined log source of output read now from ``streams[index]``."""
        task_id = self.owners[index // 3]
        return "executor" if task_id is None else f"task:{task_id}"

    def signal_group(self, signum: int) -> None:
        """Signal the worker's process group: its task and every child the task started.

        A worker started by forkserver or spawn makes that group itself when it starts
        (the manager cannot do it for a process that is not its child, or has exec'd):
        until then the worker alone is signalled. It has run no task yet, so no child of
        a task can be missed; one started in between is killed with the group when the
        worker is retired.
        """
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            self._signal_worker(signum)
        except PermissionError:
            pass

    def _signal_worker(self, signum: int) -> None:
        if self.death_fd < 0:
            return  # reaped and closed: nothing left to signal, and the pid may be reused
        try:
            if self.death_fd != self.process.sentinel:
                signal.pidfd_send_signal(self.death_fd, signum)  # this process, never a reuse
            else:  # pragma: no cover - no pidfd (old kernel)
                os.kill(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def exit_description(self) -> str:
        """How the (dead) worker process ended, for error messages."""
        self.process.join()
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"was killed by signal {signal.Signals(-code).name} ({-code})"
        return f"exited with code {code}"

    def close(self) -> None:
        for connection in (self.tasks, self.results, *self.streams):
            connection.close()
        if self.death_fd != self.process.sentinel:
            os.close(self.death_fd)
        self.death_fd = -1


def _death_fd(process: BaseProcess) -> int:
    """A descriptor that becomes readable when `process` ends. The sentinel is a pipe that
    every child the task forks inherits, so it stays open while any of them lives; a pidfd
    follows the worker alone (Linux 5.3 and later)."""
    try:
        return os.pidfd_open(process.pid or 0)
    except (AttributeError, OSError):  # pragma: no cover - old kernel or Python
        return process.sentinel


def spawn_worker(context: BaseContext, boot_fields: dict[str, Any]) -> WorkerHandle:
    """Start one worker process with fresh pipes."""
    task_r, task_w = Pipe(duplex=False)
    result_r, result_w = Pipe(duplex=False)
    stream_pairs = [Pipe(duplex=False) for _ in range(CAPTURE_SLOTS * len(STREAMS))]
    writers = [w for _, w in stream_pairs]
    boot = WorkerBoot(
        tasks=task_r,
        results=result_w,
        capture=tuple(
            (writers[i], writers[i + 1], writers[i + 2]) for i in range(0, len(writers), 3)
        ),
        **boot_fields,
    )
    # typeshed's BaseContext lacks Process, which every concrete context has.
    process_class: type[BaseProcess] = context.Process  # type: ignore[attr-defined]
    process = process_class(target=worker_main, args=(boot,), name="executor-worker")
    process.start()
    for child_end in (task_r, result_w, *(w for _, w in stream_pairs)):
        child_end.close()
    try:
        os.setpgid(process.pid or 0, process.pid or 0)  # also done by the worker; no race
    except OSError:
        pass  # already done by the worker, or not our child (forkserver)
    for reader, _ in stream_pairs:
        os.set_blocking(reader.fileno(), False)
    os.set_blocking(result_r.fileno(), False)
    os.set_blocking(task_w.fileno(), False)
    return WorkerHandle(process, task_w, result_r, [reader for reader, _ in stream_pairs])
