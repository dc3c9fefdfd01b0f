"""Worker processes as the manager sees them: start, message, signal, reap.

Each worker gets five pipes. The manager keeps the write end of ``tasks`` and the read
ends of ``results``, ``out``, ``err`` and ``log``; its copies of the worker's ends are
closed right after the start, so a dead worker's pipes report end-of-file and nothing
the worker wrote before dying is lost.

    manager                               worker (own process group)
    tasks  ──(task_id, attempt, ...)──►   recv, fn(ctx, **args)
    results ◄──(DONE | BLOCKED | ...)──   send
    out/err/log ◄──── raw bytes ──────    fd 1, fd 2, logging handler
"""

from __future__ import annotations

import os
import signal
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from typing import Any

from executor.combined_log import ERR, LOG, OUT, LineSplitter
from executor.framing import FrameReader, write_frame
from executor.worker import WorkerBoot, worker_main

STREAMS = (OUT, ERR, LOG)


class WorkerHandle:
    """One live worker process and its pipes, plus what it is running."""

    def __init__(
        self,
        process: BaseProcess,
        tasks: Connection,
        results: Connection,
        streams: list[Connection],
    ) -> None:
        self.process = process
        self.pid: int = process.pid or 0
        self.tasks = tasks
        self.results = results
        self.streams = streams
        self.splitters = [LineSplitter(stream) for stream in STREAMS]
        self.reader = FrameReader()
        """Reassembles messages from the results pipe."""
        self.task: tuple[str, int] | None = None
        """(task_id, attempt) while busy."""
        self.last_task: str | None = None
        """Output arriving between tasks is attributed to the task before."""
        self.blocked_topic: str | None = None
        """The topic its task waits for in ctx.events.wait, if it is blocked."""
        self.kill_reason: dict[str, Any] | None = None
        """The error to record when the manager kills this worker on purpose."""
        self.dispatched_at = 0.0
        """When the current task was sent (the start of an attempt that crashes)."""
        self.retired = False
        """Set once the manager has reaped it and closed its pipes."""

    @property
    def source(self) -> str:
        """The combined log source for output read from this worker now."""
        task_id = self.task[0] if self.task else self.last_task
        return "executor" if task_id is None else f"task:{task_id}"

    def send_task(self, data: bytes) -> None:
        """Send one frame (executor/framing.py) to the worker."""
        write_frame(self.tasks.fileno(), data)

    def signal_group(self, signum: int) -> None:
        """Signal the worker's process group: its task and every child the task started."""
        try:
            os.killpg(self.pid, signum)
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


def spawn_worker(context: BaseContext, boot_fields: dict[str, Any]) -> WorkerHandle:
    """Start one worker process with fresh pipes."""
    task_r, task_w = Pipe(duplex=False)
    result_r, result_w = Pipe(duplex=False)
    stream_pairs = [Pipe(duplex=False) for _ in STREAMS]
    boot = WorkerBoot(
        tasks=task_r,
        results=result_w,
        out=stream_pairs[0][1],
        err=stream_pairs[1][1],
        log=stream_pairs[2][1],
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
    return WorkerHandle(process, task_w, result_r, [reader for reader, _ in stream_pairs])
