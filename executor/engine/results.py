"""The results document (docs/reference/results.md) and writing it to disk atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from executor.engine.scheduler import FAILED, SUCCEEDED, UPSTREAM_FAILED, DagState, TaskRecord
from executor.files import write_output
from executor.pipeline import Pipeline
from executor.timefmt import rfc3339, rfc3339_or_none

RUN_SUCCEEDED, RUN_FAILED, RUN_CANCELLED = "succeeded", "failed", "cancelled"


def run_status(state: DagState, cancelled: bool) -> str:
    """``cancelled`` if the run was cancelled, else whether every task succeeded."""
    if cancelled:
        return RUN_CANCELLED
    if all(record.status == SUCCEEDED for record in state.records.values()):
        return RUN_SUCCEEDED
    return RUN_FAILED


def build_results(
    pipeline: Pipeline,
    state: DagState,
    *,
    run_id: str,
    node_id: str,
    status: str,
    started: float,
    finished: float,
    log_path: Path,
) -> dict[str, Any]:
    """The results dict, tasks in pipeline order."""
    tasks: dict[str, Any] = {}
    for task_id, record in state.records.items():
        duration = None
        if record.started_at is not None and record.finished_at is not None:
            duration = round(max(0.0, record.finished_at - record.started_at), 6)
        tasks[task_id] = {
            "status": record.status,
            "attempts": record.attempts,
            "started_at": rfc3339_or_none(record.started_at),
            "finished_at": rfc3339_or_none(record.finished_at),
            "duration_s": duration,
            "result": None if record.result_json is None else json.loads(record.result_json),
            "error": _error(record),
        }
    return {
        "run_id": run_id,
        "node_id": node_id,
        "pipeline": pipeline.name,
        "status": status,
        "started_at": rfc3339(started),
        "finished_at": rfc3339(finished),
        "tasks": tasks,
        "log_path": str(log_path),
    }


def _error(record: TaskRecord) -> dict[str, Any] | None:
    if record.status == FAILED:
        return record.error
    if record.status == UPSTREAM_FAILED:
        names = ", ".join(record.blocked_by)
        message = f"not run: upstream task(s) did not succeed: {names}"
        return {"type": "UpstreamFailed", "message": message, "traceback": None}
    return None


def write_results(path: str | os.PathLike[str], results: dict[str, Any]) -> None:
    """Write ``results`` as JSON; readers never see a half-written file (executor/files.py)."""
    write_output(path, (json.dumps(results, indent=2) + "\n").encode("utf-8"))
