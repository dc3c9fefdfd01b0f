"""Run a pipeline on a pool of pre-forked workers; the manager owns all scheduling state.

    ┌──────────── manager (this module, one thread) ─────────────┐
    │ DagState · timer heap (retries, timeouts, grace, deadlock) │
    │ one epoll set over every worker's pipes and sentinel,      │
    │ plus the signal wake-up pipe                               │
    └──┬───────────────▲──────────────▲────────────────▲─────────┘
  task │        result │  out/err/log │       sentinel │
       ▼               │              │                │
    worker 1 … worker N (own process groups; see executor/engine/worker.py)

One loop iteration: wait on the epoll set; read output (before results, so a task's
"finished" line follows all it wrote), results and deaths; fire due timers; dispatch
ready tasks to idle workers; only then write log lines, publish lifecycle events and
report progress, so none of that lengthens the gap between two tasks.
"""

from __future__ import annotations

import heapq
import itertools
import multiprocessing
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from executor.contention import CPUS, SPIN_S, Contention, spin_poll
from executor.engine.combined_log import CombinedLog
from executor.engine.leftovers import Leftovers
from executor.engine.messages import (
    Blocked,
    Done,
    EventsUsed,
    FromWorker,
    Returned,
    Unblocked,
    frame_ack,
    frame_run_task,
    frame_stop,
    from_worker,
)
from executor.engine.pool import (
    CAPTURE_SLOTS,
    QUEUE_DEPTH,
    STREAMS,
    WorkerHandle,
    allow_descriptors,
    spawn_worker,
)
from executor.engine.results import build_results, run_status, write_results
from executor.engine.scheduler import DagState
from executor.pipeline import Pipeline
from executor.services.events import Events
from executor.services.server import RunServices
from executor.services.wire import ServiceError

ProgressCallback = Callable[[int, int], None]

# Selector priorities: a batch is handled output first, then results, then deaths.
_STREAM, _RESULT, _SENTINEL, _WAKEUP, _WRITABLE = 0, 1, 2, 3, 4
_READ_SIZE = 64 * 1024
_STOP = frame_stop()
_ACK = frame_ack()
# A worker that dies this many times in a row before running a task is not replaced.
_MAX_STARTUP_DEATHS = 3
_TOPIC = "executor.task."
# Tasks are "short" while they take less than this on average: only then are tasks queued
# behind a running one (prefetch) and does anyone spin for the next message.
_SHORT_TASK_S = 0.002
# Lifecycle events are published in bursts: when this many are waiting, or this late.
_LIFECYCLE_BATCH = 64
_LIFECYCLE_DELAY_S = 0.002
# The log file is flushed this often while a run goes (a write per task costs too much).
_LOG_FLUSH_S = 0.05


@dataclass(frozen=True)
class RunConfig:
    """How to run a pipeline."""

    workers: int
    """Worker processes (at most one per task is started)."""
    run_id: str
    node_id: str
    log_path: Path
    """The combined log; appended to."""
    results_path: Path | None = None
    """Where to write the results JSON, if anywhere."""
    grace_s: float = 5.0
    """On cancel, seconds between SIGTERM and SIGKILL to running tasks."""
    start_method: str | None = None
    """multiprocessing start method (``fork``, ``forkserver``, ``spawn``); None: default."""
    deadlock_grace_s: float = 1.0
    """How long every worker must stay blocked in events.wait before that is a deadlock."""
    prefetch: bool = True
    """Queue tasks behind a running one while tasks are short (faster wide DAGs)."""


def run(
    pipeline: Pipeline, config: RunConfig, on_progress: ProgressCallback | None = None
) -> dict[str, Any]:
    """Run ``pipeline``; return the results dict (also written to ``config.results_path``).

    SIGTERM and SIGINT cancel the run while it goes (when called from the main thread);
    the previous handlers are restored afterwards.
    """
    if config.workers < 1:
        raise ValueError("workers must be at least 1")
    with CombinedLog(config.log_path) as log, Leftovers(log.executor):
        results = _Manager(pipeline, config, log, on_progress).execute()
    if config.results_path is not None:
        write_results(config.results_path, results)
    return results


class _Manager:
    def __init__(
        self,
        pipeline: Pipeline,
        config: RunConfig,
        log: CombinedLog,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.pipeline = pipeline
        self.config = config
        self.log = log
        self.on_progress = on_progress
        self.state = DagState(pipeline)
        self.poller = _Poller()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.timer_seq = itertools.count()
        self.workers: list[WorkerHandle] = []
        self.idle: list[WorkerHandle] = []
        self.busy = 0
        self.blocked = 0
        self.retry_waits = 0
        self.notes: list[tuple[str, str, int, str, str]] = []
        """(topic, task_id, attempt, status, log text), emitted after dispatch."""
        self.lifecycle: list[tuple[str, str, int, str, str]] = []
        """Notes whose lifecycle events are not published yet."""
        self.lifecycle_armed = False
        self.lifecycle_on = False
        """Lifecycle events are published once a task has used ctx.events."""
        self.latest_lifecycle: dict[str, tuple[str, str, int, str, str]] = {}
        """Until then, the latest note of each lifecycle topic."""
        self.log_flush_armed = False
        self.ended = 0
        self.cancel_signal: int | None = None
        self.cancelling = False
        self.startup_deaths = 0
        self.task_seconds: float | None = None
        """Moving average of task durations (decides whether to prefetch)."""
        self.waited = False
        """Whether a task has used events (then no more prefetch)."""
        self.generation = 0
        self.deadlock_armed = False
        self.publisher: Events | None = None
        self.contention = Contention()
        self.boot_fields: dict[str, Any] = {}

    # --- the run ---------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        started = time.time()
        tasks = len(self.pipeline.tasks)
        pool_size = min(self.config.workers, tasks)
        allow_descriptors(pool_size)
        self.log.executor(
            f"run {self.config.run_id} started: pipeline {self.pipeline.name} ({tasks} tasks) "
            f"on node {self.config.node_id} with {pool_size} workers"
        )
        services = RunServices(self.config.run_id)
        services.start()
        try:
            self.publisher = services.publisher()
            self.boot_fields = {
                "root": str(self.pipeline.root),
                "calls": tuple(sorted({t.call for t in self.pipeline.tasks.values()})),
                "run_id": self.config.run_id,
                "node_id": self.config.node_id,
                "services_address": services.address,
            }
            with self._cancel_on_signals():
                for _ in range(pool_size):
                    self._spawn()
                self._loop()
        finally:
            self._stop_workers()
            services.stop()
            self.poller.close()
        finished = time.time()
        status = run_status(self.state, cancelled=self.cancelling)
        summary = ", ".join(f"{n} {s}" for s, n in sorted(self.state.counts().items()))
        self.log.executor(
            f"run {self.config.run_id} {status} in {finished - started:.3f} s: {summary}"
        )
        return build_results(
            self.pipeline,
            self.state,
            run_id=self.config.run_id,
            node_id=self.config.node_id,
            status=status,
            started=started,
            finished=finished,
            log_path=self.config.log_path,
        )

    def _loop(self) -> None:
        wait = self.poller.wait
        while True:
            self._dispatch()
            if self.notes:
                self._emit_notes()
            if self.blocked:
                self._check_deadlock()
            if self.state.done and not self.busy:
                self._publish_lifecycle()
                return
            if self.log.unflushed and not self.log_flush_armed:
                self.log_flush_armed = True
                self._after(_LOG_FLUSH_S, self._flush_log)
            events = wait(self._next_timeout(), SPIN_S if self._results_due_soon() else 0.0)
            if self.cancel_signal is not None and not self.cancelling:
                # Before the deaths in this batch: a service stop signals every process
                # at once, and its workers' deaths are part of the cancel, not crashes.
                self._cancel()
            if len(events) > 1:
                events.sort(key=_kind)
            for kind, worker, index in events:
                self._handle(kind, worker, index)
            if self.timers:
                self._fire_timers()
            if self.cancel_signal is not None and not self.cancelling:
                self._cancel()

    def _handle(self, kind: int, worker: WorkerHandle | None, index: int) -> None:
        if kind == _WAKEUP:
            try:
                os.read(index, _READ_SIZE)
            except BlockingIOError:
                pass
        elif worker is None or worker.retired:
            return  # an event of a worker handled as dead earlier in this batch
        elif kind == _STREAM:
            self._read_stream(worker, index)
        elif kind == _RESULT:
            self._read_results(worker)
        elif kind == _WRITABLE:
            self._write_backlog(worker)
        else:
            self._worker_died(worker)

    # --- dispatch ----------------------------------------------------------------

    def _dispatch(self) -> None:
        ready, idle = self.state.ready, self.idle
        if not ready:
            return
        sent: list[WorkerHandle] = []
        while ready and idle:
            worker = idle.pop()
            self._send(worker, ready.popleft())
            sent.append(worker)
        if ready and self._prefetching():
            for depth in range(QUEUE_DEPTH):  # round robin: one more per worker per pass
                for worker in self.workers:
                    if worker.task is not None and len(worker.queued) == depth and not worker.waits:
                        self._send(worker, ready.popleft())
                        if len(worker.outbox) == 1:  # its first task of this dispatch
                            sent.append(worker)
                        if not ready:
                            break
                if not ready:
                    break
        for worker in sent:
            data, worker.outbox = b"".join(worker.outbox), []
            self._write(worker, data)

    def _results_due_soon(self) -> bool:
        """Worth looking for a result before sleeping: tasks run, they are short on
        average, a CPU is left for the manager (else spinning slows the workers), and the
        machine's CPUs are not contended (see executor/contention.py)."""
        return 0 < self.busy < CPUS and self._tasks_are_short() and self.contention.quiet()

    def _prefetching(self) -> bool:
        """Queue a task behind a running one only while tasks are short (then the
        worker starts it without waiting for the manager, and nothing waits long behind
        a task that runs for a while) and until a task first waits for an event: tasks
        that coordinate through events keep the ready queue's order."""
        return self.config.prefetch and not self.waited and self._tasks_are_short()

    def _tasks_are_short(self) -> bool:
        """The moving average of task durations is known and under _SHORT_TASK_S."""
        average = self.task_seconds
        return average is not None and average < _SHORT_TASK_S

    def _send(self, worker: WorkerHandle, task_id: str) -> None:
        """Give ``task_id`` to ``worker`` (sent by the next flush): to run now if it is
        idle, else queued."""
        now = time.time()
        attempt = self.state.start(task_id, now)
        task = self.pipeline.tasks[task_id]
        slot = worker.free_slots.pop()
        worker.owners[slot] = task_id
        if worker.task is None:
            self._begin(worker, task_id, attempt, slot, now)
            text = "started"
        else:
            worker.queued.append((task_id, attempt, slot))
            text = f"started (queued behind {worker.task[0]})"
        upstream = self.state.upstream_json(task_id)
        spin = self._results_due_soon()  # then the worker may look for its next task too
        worker.outbox.append(
            frame_run_task(task_id, attempt, task.call, task.args, upstream, slot, spin)
        )
        self.notes.append(("started", task_id, attempt, "running", text))

    def _begin(
        self, worker: WorkerHandle, task_id: str, attempt: int, slot: int, now: float
    ) -> None:
        """``worker`` runs ``task_id`` from now on."""
        worker.task = (task_id, attempt)
        worker.slot = slot
        worker.dispatched_at = now
        self.busy += 1
        self.generation += 1
        timeout = self.pipeline.tasks[task_id].timeout
        if timeout is not None:
            self._after(timeout, self._timeout_action(worker, task_id, attempt))

    def _emit_notes(self) -> None:
        notes, self.notes = self.notes, []
        self.log.executor(
            *[
                f"task {task_id} attempt {attempt} {text}" if attempt else f"task {task_id} {text}"
                for _, task_id, attempt, _, text in notes
            ]
        )
        if not self.lifecycle_on:
            for note in notes:
                self.latest_lifecycle[note[0]] = note
        else:
            self.lifecycle += notes
            if len(self.lifecycle) >= _LIFECYCLE_BATCH:
                self._publish_lifecycle()
            elif not self.lifecycle_armed:
                self.lifecycle_armed = True
                self._after(_LIFECYCLE_DELAY_S, self._publish_lifecycle)
        if self.on_progress is not None and self.ended:
            self.ended = 0
            total = len(self.pipeline.tasks)
            try:
                self.on_progress(total - self.state.unfinished, total)
            except Exception as exc:  # a reporting problem must not end the run
                self.log.executor(f"progress callback failed, disabled: {exc!r}")
                self.on_progress = None

    def _publish_lifecycle(self) -> None:
        """Publish the lifecycle events gathered so far.

        Each publish wakes the services process; on a busy machine that costs more than
        a short task, so events are sent in bursts, at most _LIFECYCLE_DELAY_S late.
        """
        notes, self.lifecycle = self.lifecycle, []
        self.lifecycle_armed = False
        if self.publisher is None:
            return
        try:
            for topic, task_id, attempt, status, _ in notes:
                payload = {"task_id": task_id, "attempt": attempt, "status": status}
                self.publisher.publish(_TOPIC + topic, payload)
        except ServiceError as exc:  # the tasks' store and events are gone; the run goes on
            self.log.executor(f"lifecycle events stopped: {exc}", stream="err")
            self.publisher = None

    def _flush_log(self) -> None:
        self.log_flush_armed = False
        self.log.flush()

    # --- results and failures ----------------------------------------------------

    def _read_results(self, worker: WorkerHandle) -> None:
        try:
            data = os.read(worker.results.fileno(), _READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.poller.unregister(worker.results.fileno())  # dying: its sentinel comes next
            return
        # The first message of a read that starts a frame was in the pipe when the wait
        # returned, and so was all the output its task wrote before it: that output was
        # read earlier in this batch (streams go first). Later ones may be newer.
        settled = worker.reader.empty
        for message in worker.reader.feed(data):
            self._on_message(worker, from_worker(message), settled)
            settled = False

    def _drain_results(self, worker: WorkerHandle) -> None:
        for data in _available(worker.results):
            for message in worker.reader.feed(data):
                self._on_message(worker, from_worker(message))

    def _on_message(self, worker: WorkerHandle, message: FromWorker, settled: bool = False) -> None:
        """Handle one message from ``worker``; ``settled``: its task's output is all read."""
        if isinstance(message, Done):
            if settled or not message.unread:  # all the task wrote was read already
                self._flush_partial_lines(worker, worker.slot)
            else:
                self._drain_slot(worker, worker.slot)
            self._task_done(worker, message)
        elif isinstance(message, Blocked):
            worker.waits += 1
            self.waited = True
            if not message.timed:  # a timed wait ends by itself: it cannot deadlock
                worker.blocked_topic = message.topic
                self.blocked += 1
            self.generation += 1
            self._write(worker, _ACK)  # the worker gives back what is queued behind
        elif isinstance(message, Unblocked):
            worker.waits = max(0, worker.waits - 1)
            if worker.blocked_topic is not None:
                worker.blocked_topic = None
                self.blocked -= 1
            self.generation += 1
        elif isinstance(message, Returned):
            self._give_back(worker, message.task_ids)
        elif isinstance(message, EventsUsed):
            self.waited = True  # tasks that coordinate through events keep their order
            if not self.lifecycle_on:
                self._start_lifecycle()
            self._write(worker, _ACK)

    def _start_lifecycle(self) -> None:
        """A task uses events: from now on publish every lifecycle event, starting with
        the latest one of each topic (a wait on a topic returns its latest payload)."""
        self.lifecycle_on = True
        self.lifecycle = [*self.latest_lifecycle.values(), *self.lifecycle]
        self.latest_lifecycle.clear()
        self._publish_lifecycle()

    def _give_back(self, worker: WorkerHandle, task_ids: list[str]) -> None:
        """Tasks queued on ``worker`` that it will not run go back to the ready queue,
        first in line, in their order."""
        returned = set(task_ids)
        kept = [entry for entry in worker.queued if entry[0] not in returned]
        for task_id, attempt, slot in reversed(worker.queued):
            if task_id in returned:
                worker.free_slots.append(slot)
                self.log.executor(f"task {task_id} attempt {attempt} given back unstarted")
                if not self.cancelling:
                    self.state.unstart(task_id)
        worker.queued.clear()
        worker.queued.extend(kept)
        self.generation += 1

    def _task_done(self, worker: WorkerHandle, done: Done) -> None:
        self._release(worker)
        if worker.queued:
            self._begin(worker, *worker.queued.popleft(), time.time())
        else:
            self.idle.append(worker)
        self.startup_deaths = 0
        task_id, attempt = done.task_id, done.attempt
        started, finished = done.started, done.finished
        duration = finished - started
        average = self.task_seconds
        self.task_seconds = duration if average is None else 0.9 * average + 0.1 * duration
        if self.cancelling:
            return  # the task is already recorded as cancelled
        if done.ok:
            self.state.succeeded(task_id, done.payload, started, finished)
            self._ended(task_id, attempt, "finished", "succeeded", f"{duration:.6f} s")
        else:
            self._attempt_failed(task_id, attempt, done.payload, started, finished)

    def _release(self, worker: WorkerHandle) -> None:
        """``worker`` no longer runs its task."""
        if worker.task is not None:
            worker.task = None
            worker.free_slots.append(worker.slot)
            self.busy -= 1
        if worker.blocked_topic is not None:
            worker.blocked_topic = None
            self.blocked -= 1
        worker.waits = 0
        self.generation += 1

    def _attempt_failed(
        self, task_id: str, attempt: int, error: dict[str, Any], started: float, finished: float
    ) -> None:
        delay, skipped = self.state.attempt_failed(task_id, error, started, finished)
        reason = f"{error['type']}: {error['message']}"
        if delay is not None:
            self.retry_waits += 1
            self._after(delay, lambda: self._retry_due(task_id))
            text = f"failed, retrying in {delay:g} s: {reason}"
            self.notes.append(("retried", task_id, attempt, "retrying", text))
            return
        self._ended(task_id, attempt, "failed", "failed", f"{reason}")
        for skipped_id in skipped:
            record = self.state.records[skipped_id]
            text = f"not run: upstream {', '.join(record.blocked_by)} did not succeed"
            self._ended(skipped_id, 0, "failed", "upstream_failed", text)

    def _ended(self, task_id: str, attempt: int, topic: str, status: str, detail: str) -> None:
        self.ended += 1
        self.notes.append((topic, task_id, attempt, status, f"{status}: {detail}"))

    def _retry_due(self, task_id: str) -> None:
        self.retry_waits -= 1
        if not self.cancelling:
            self.state.retry_due(task_id)

    def _worker_died(self, worker: WorkerHandle) -> None:
        self._drain_results(worker)  # what it reported before dying still counts
        self._retire(worker)
        description = worker.exit_description()
        task = worker.task
        self._release(worker)
        self._give_back(worker, [task_id for task_id, _, _ in worker.queued])
        if task is None:
            self.log.executor(f"worker {worker.pid} {description} while idle")
            self.startup_deaths += 1
        elif not self.cancelling:
            task_id, attempt = task
            error = worker.kill_reason or {
                "type": "WorkerCrashed",
                "message": f"the worker process {description} while running the task",
                "traceback": None,
            }
            self._attempt_failed(task_id, attempt, error, worker.dispatched_at, time.time())
        if self.cancelling or self.state.done:
            return
        if self.startup_deaths < _MAX_STARTUP_DEATHS:
            self._spawn()
        elif not self.workers:
            self.log.executor("workers keep dying before running a task: giving up")
            self._cancel()

    # --- output capture ------------------------------------------------------------

    def _read_stream(self, worker: WorkerHandle, index: int) -> None:
        connection = worker.streams[index]
        try:
            data = os.read(connection.fileno(), _READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            self.poller.unregister(connection.fileno())
            return
        complete = worker.splitters[index].feed(data)
        if complete:
            self.log.write(worker.source(index), STREAMS[index % 3], complete, time.time())

    def _drain_slot(self, worker: WorkerHandle, slot: int) -> None:
        """Read all that is in one capture slot's pipes, then its unfinished last lines.

        Called when the slot's task has ended: a queued task may have started and
        finished after the last wait returned, so epoll's readiness is not enough.
        """
        for index in range(slot * 3, slot * 3 + 3):
            for data in _available(worker.streams[index]):
                complete = worker.splitters[index].feed(data)
                if complete:
                    stream = STREAMS[index % 3]
                    self.log.write(worker.source(index), stream, complete, time.time())
        self._flush_partial_lines(worker, slot)

    def _flush_partial_lines(self, worker: WorkerHandle, slot: int) -> None:
        """Write the unfinished last lines of one capture slot (its task has ended)."""
        for index in range(slot * 3, slot * 3 + 3):
            rest = worker.splitters[index].rest()
            if rest:
                self.log.write(worker.source(index), STREAMS[index % 3], rest, time.time())

    # --- workers -----------------------------------------------------------------

    def _spawn(self) -> None:
        self.log.flush()  # a forked child must not inherit unwritten log lines
        context = multiprocessing.get_context(self.config.start_method)
        worker = spawn_worker(context, self.boot_fields)
        register = self.poller.register
        for index, connection in enumerate(worker.streams):
            register(connection.fileno(), (_STREAM, worker, index))
        register(worker.results.fileno(), (_RESULT, worker, 0))
        register(worker.death_fd, (_SENTINEL, worker, 0))
        self.workers.append(worker)
        self.idle.append(worker)

    def _write(self, worker: WorkerHandle, data: bytes) -> None:
        """Send frames to ``worker`` without waiting: a worker whose task prints more
        than its output pipe holds reads its next tasks only once the manager has read
        that output, so a blocked write would stop both for good. What the task pipe
        cannot take now goes out when epoll says it has room."""
        try:
            if worker.writer.send(data):
                fd = worker.tasks.fileno()
                self.poller.register(fd, (_WRITABLE, worker, 0), select.EPOLLOUT)
        except OSError:
            pass  # the worker just died: its sentinel fails or returns these attempts

    def _write_backlog(self, worker: WorkerHandle) -> None:
        try:
            if worker.writer.flush():
                return
        except OSError:
            worker.writer.discard()  # the worker just died (as above)
        self.poller.unregister(worker.tasks.fileno())

    def _retire(self, worker: WorkerHandle) -> None:
        """Collect a finished worker's last output, stop watching it, close its pipes."""
        for slot in range(CAPTURE_SLOTS):
            self._drain_slot(worker, slot)
        worker.retired = True
        self.workers.remove(worker)
        if worker in self.idle:
            self.idle.remove(worker)
        for connection in (*worker.streams, worker.results, worker.tasks):
            self.poller.unregister(connection.fileno())
        self.poller.unregister(worker.death_fd)
        worker.close()
        worker.signal_group(signal.SIGKILL)  # children a task left behind

    def _stop_workers(self) -> None:
        for worker in self.workers:
            if worker.task is None:
                self._write(worker, _STOP)
            if worker.task is not None or worker.writer.backlog:
                worker.signal_group(signal.SIGKILL)  # (no loop is left to write a backlog)
        deadline = time.monotonic() + self.config.grace_s
        for worker in list(self.workers):
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.signal_group(signal.SIGKILL)
                worker.process.join()
            self._retire(worker)

    # --- timers: retries, timeouts, cancel grace, deadlock -------------------------

    def _after(self, delay: float, action: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_seq), action))

    def _next_timeout(self) -> float | None:
        if not self.timers:
            return None
        return max(0.0, self.timers[0][0] - time.monotonic())

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            heapq.heappop(self.timers)[2]()

    def _timeout_action(
        self, worker: WorkerHandle, task_id: str, attempt: int
    ) -> Callable[[], None]:
        def expire() -> None:
            if worker.task == (task_id, attempt) and not worker.retired:
                timeout = self.pipeline.tasks[task_id].timeout
                worker.kill_reason = {
                    "type": "TimeoutError",
                    "message": f"attempt {attempt} exceeded the timeout of {timeout:g} s; "
                    "its process group was killed",
                    "traceback": None,
                }
                worker.signal_group(signal.SIGKILL)

        return expire

    # --- deadlock: every running task blocked in ctx.events.wait ------------------

    def _deadlocked(self) -> bool:
        if self.cancelling or self.blocked == 0 or self.blocked < self.busy:
            return False
        can_start_more = self.idle and (self.state.ready or self.retry_waits)
        return not can_start_more

    def _check_deadlock(self) -> None:
        # A publish may be on its way to a blocked task (its unblock notice not here
        # yet): only a state unchanged for deadlock_grace_s counts as a deadlock.
        if self.deadlock_armed or not self._deadlocked():
            return
        self.deadlock_armed = True
        generation = self.generation

        def confirm() -> None:
            self.deadlock_armed = False
            if self.generation == generation and self._deadlocked():
                self._break_deadlock()

        self._after(self.config.deadlock_grace_s, confirm)

    def _break_deadlock(self) -> None:
        stuck = [w for w in self.workers if w.task is not None]
        topics = ", ".join(sorted({str(w.blocked_topic) for w in stuck}))
        error = {
            "type": "EventDeadlock",
            "message": f"all {len(self.workers)} workers were blocked in ctx.events.wait "
            f"(topics: {topics}) and no other task could run to publish; give the run "
            "more workers than the pipeline has tasks waiting at the same time",
            "traceback": None,
        }
        self.log.executor(f"deadlock: {error['message']}")
        for worker in stuck:
            worker.kill_reason = error
            worker.signal_group(signal.SIGKILL)

    # --- cancellation ------------------------------------------------------------

    @contextmanager
    def _cancel_on_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.poller.register(wake_r, (_WAKEUP, None, wake_r))
        previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _CANCEL_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
            signal.set_wakeup_fd(previous_fd)
            self.poller.unregister(wake_r)
            os.close(wake_r)
            os.close(wake_w)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.cancel_signal = signum

    def _cancel(self) -> None:
        self.cancelling = True
        cause = "no workers left"
        if self.cancel_signal is not None:
            cause = f"received {signal.Signals(self.cancel_signal).name}"
        running = [w for w in self.workers if w.task is not None]
        cancelled = self.state.cancel_unfinished(time.time())
        self.log.executor(
            f"{cause}: cancelling the run ({len(running)} running, "
            f"{len(cancelled) - len(running)} not started)"
        )
        for task_id in cancelled:
            self.log.executor(f"task {task_id} cancelled")
        for worker in running:
            worker.signal_group(signal.SIGTERM)
        self._after(self.config.grace_s, self._kill_running)

    def _kill_running(self) -> None:
        for worker in self.workers:
            if worker.task is not None:
                worker.signal_group(signal.SIGKILL)


_CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGINT)

Watched = tuple[int, WorkerHandle | None, int]
"""(kind, worker, index): what a ready file descriptor means to the manager."""


def _available(connection: Connection) -> Iterator[bytes]:
    """Everything that can be read now from a non-blocking pipe, chunk by chunk."""
    while not connection.closed:
        try:
            data = os.read(connection.fileno(), _READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            return
        yield data


def _kind(watched: Watched) -> int:
    return watched[0]


class _Poller:
    """select.epoll keyed by descriptor (the selectors module's bookkeeping costs
    microseconds per wait, and the manager waits once per task)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watched: dict[int, Watched] = {}

    def register(self, fd: int, watched: Watched, events: int = select.EPOLLIN) -> None:
        self._epoll.register(fd, events)
        self._watched[fd] = watched

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; a no-op when it is not watched."""
        if self._watched.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def wait(self, timeout: float | None, spin_s: float = 0.0) -> list[Watched]:
        """Block until a descriptor is ready or ``timeout`` seconds pass; first look
        without sleeping for up to ``spin_s`` seconds (see executor.contention.SPIN_S)."""
        watched = self._watched
        poll = self._epoll.poll
        ready = spin_poll(poll, spin_s) if spin_s else None
        if not ready:
            ready = poll(-1 if timeout is None else timeout)
        return [watched[fd] for fd, _ in ready if fd in watched]

    def close(self) -> None:
        self._epoll.close()
