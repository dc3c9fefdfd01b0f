"""The DAG's scheduling state: which tasks are ready, running, waiting or final.

Pure bookkeeping with no processes or clocks of its own, so every transition is unit
tested directly. The engine's manager loop is its only user; all methods that change the
state say so, and the first return value of each is what the engine must act on.

    pending --(last upstream final)--> ready --start()--> running --unstart()--> ready
    running --succeeded()--> succeeded
    running --attempt_failed()--> retry wait --retry_due()--> ready   (attempts left)
                              \\--> failed                           (no attempts left)
    pending --(an upstream not succeeded, trigger all_success)--> upstream_failed
    pending | ready | running | retry wait --cancel_unfinished()--> cancelled
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from executor.pipeline import Pipeline

PENDING, READY, RUNNING, RETRY_WAIT = "pending", "ready", "running", "retry_wait"
SUCCEEDED, FAILED, UPSTREAM_FAILED, CANCELLED = (
    "succeeded",
    "failed",
    "upstream_failed",
    "cancelled",
)
FINAL = frozenset({SUCCEEDED, FAILED, UPSTREAM_FAILED, CANCELLED})


@dataclass
class TaskRecord:
    """What happened to one task; becomes its entry in the results file."""

    status: str = PENDING
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    result_json: str | None = None
    """The return value as JSON text (kept as text until the results are written)."""
    error: dict[str, Any] | None = None
    blocked_by: list[str] = field(default_factory=list)
    """Upstream ids that did not succeed (for the upstream_failed message)."""


class DagState:
    """Scheduling state of one run of ``pipeline``."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.tasks = pipeline.tasks
        self.records = {task_id: TaskRecord() for task_id in self.tasks}
        self.ready: deque[str] = deque()
        self.unfinished = len(self.tasks)
        self._waiting_on = {task_id: len(task.after) for task_id, task in self.tasks.items()}
        self._downstream: dict[str, list[str]] = {task_id: [] for task_id in self.tasks}
        for task in self.tasks.values():
            for upstream in task.after:
                self._downstream[upstream].append(task.id)
        for task_id, count in self._waiting_on.items():
            if count == 0:
                self._make_ready(task_id)

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    def start(self, task_id: str, now: float) -> int:
        """Mutates: ``task_id`` (taken from ``ready``) runs now; returns its attempt number."""
        record = self.records[task_id]
        record.status = RUNNING
        record.attempts += 1
        if record.started_at is None:
            record.started_at = now
        return record.attempts

    def upstream_json(self, task_id: str) -> dict[str, str | None]:
        """The results of ``task_id``'s upstream tasks as JSON text (None: not succeeded)."""
        records = self.records
        return {up: records[up].result_json for up in self.tasks[task_id].after}

    def succeeded(
        self, task_id: str, result_json: str, started: float, finished: float
    ) -> list[str]:
        """Mutates: the running attempt returned ``result_json``.

        Returns the tasks that became upstream_failed (none here; same shape as the others).
        """
        record = self.records[task_id]
        record.result_json = result_json
        self._stamp(record, started, finished)
        return self._finish(task_id, SUCCEEDED)

    def attempt_failed(
        self, task_id: str, error: dict[str, Any], started: float, finished: float
    ) -> tuple[float | None, list[str]]:
        """Mutates: the running attempt failed with ``error``.

        Returns ``(retry_delay, upstream_failed_ids)``: a delay in seconds when the task
        will be retried (call retry_due() after it), else None and the task failed.
        """
        task, record = self.tasks[task_id], self.records[task_id]
        record.error = error
        self._stamp(record, started, finished)
        if record.attempts <= task.retries:
            record.status = RETRY_WAIT
            return task.retry_delay * 2 ** (record.attempts - 1), []
        return None, self._finish(task_id, FAILED)

    def unstart(self, task_id: str) -> None:
        """Mutates: ``task_id`` was sent to a worker but never began (the worker gave it
        back or died first): it is ready again, first in line, and the attempt not counted."""
        record = self.records[task_id]
        record.attempts -= 1
        if record.attempts == 0:
            record.started_at = None
        record.status = READY
        self.ready.appendleft(task_id)

    def retry_due(self, task_id: str) -> None:
        """Mutates: the retry delay of ``task_id`` has passed; it is ready again."""
        if self.records[task_id].status == RETRY_WAIT:
            self._make_ready(task_id)

    def cancel_unfinished(self, now: float) -> list[str]:
        """Mutates: every task not yet final ends cancelled; returns their ids."""
        cancelled = [t for t, r in self.records.items() if r.status not in FINAL]
        for task_id in cancelled:
            record = self.records[task_id]
            if record.status in (RUNNING, RETRY_WAIT):
                record.finished_at = now
            record.status = CANCELLED
        self.ready.clear()
        self.unfinished = 0
        return cancelled

    def counts(self) -> dict[str, int]:
        """How many tasks are in each status."""
        counts: dict[str, int] = {}
        for record in self.records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        return counts

    def _make_ready(self, task_id: str) -> None:
        self.records[task_id].status = READY
        self.ready.append(task_id)

    @staticmethod
    def _stamp(record: TaskRecord, started: float, finished: float) -> None:
        if record.attempts == 1:
            record.started_at = started  # the worker's clock is closer to the truth
        record.finished_at = finished

    def _finish(self, task_id: str, status: str) -> list[str]:
        """Mark final and release downstream tasks; returns those that became
        upstream_failed (transitively)."""
        skipped: list[str] = []
        stack = [(task_id, status)]
        while stack:
            current, current_status = stack.pop()
            self.records[current].status = current_status
            self.unfinished -= 1
            for child in self._downstream[current]:
                if current_status != SUCCEEDED:
                    self.records[child].blocked_by.append(current)
                self._waiting_on[child] -= 1
                if self._waiting_on[child]:
                    continue
                child_record = self.records[child]
                if child_record.blocked_by and self.tasks[child].trigger == "all_success":
                    skipped.append(child)
                    stack.append((child, UPSTREAM_FAILED))
                else:
                    self._make_ready(child)
        return skipped
