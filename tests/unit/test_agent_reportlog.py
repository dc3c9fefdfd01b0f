"""The report within the server's body limit, measured as the JSON that is sent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from executor.agent.reportlog import fit_report, log_for_report

LIMIT = 256 * 1024
LEFT_OUT = re.compile(r"\[(\d+) bytes of the combined log left out of this report; the whole")


def _results(**tasks: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": "r1",
        "node_id": "node-a",
        "pipeline": "p",
        "status": "succeeded",
        "started_at": "2026-12-05T00:00:00.000000Z",
        "finished_at": "2026-12-05T00:00:01.000000Z",
        "tasks": tasks,
        "log_path": "/state/runs/r1/combined.log",
    }


def _task(result: Any = 1, error: Any = None) -> dict[str, Any]:
    return {"status": "succeeded", "attempts": 1, "started_at": None, "finished_at": None,
            "duration_s": 0.1, "result": result, "error": error}  # fmt: skip


def _sent(report: dict[str, Any]) -> int:
    return len(json.dumps(report, ensure_ascii=False).encode())


def _fit(results: dict[str, Any], log: Path, marks: str = "") -> dict[str, Any]:
    return fit_report(
        results, log_for_report(log) + marks, lambda n: log_for_report(log, n) + marks, LIMIT
    )


def test_a_report_that_fits_is_sent_as_it_is(tmp_path: Path) -> None:
    log = tmp_path / "combined.log"
    log.write_text("2026 task:a out hello\n" * 100)
    results = _results(a=_task())
    assert _fit(results, log) == {**results, "log": log.read_text()}


def test_a_log_of_control_characters_is_cut_to_fit_as_json(tmp_path: Path) -> None:
    """200 KiB on disk, under the limit; 1.2 MiB as JSON, where ESC is \\u001b."""
    log = tmp_path / "combined.log"
    lines = [f"2026 task:a out {i:05d} " + "\x1b" * 1000 + "\n" for i in range(200)]
    log.write_text("".join(lines))
    mark = "2026 executor err [the combined log is truncated: cannot write spool]\n"
    report = _fit(_results(a=_task()), log, mark)
    assert _sent(report) <= LIMIT and report["status"] == "succeeded"
    text = report["log"]
    assert text.startswith(lines[0]) and text.endswith(lines[-1] + mark)
    [left_out] = LEFT_OUT.findall(text)
    kept = [line for line in text.splitlines(keepends=True) if line in lines]
    assert int(left_out) == log.stat().st_size - sum(len(k.encode()) for k in kept)
    assert _sent(report) > LIMIT * 0.6, "cut to the limit, not far below it"


def test_results_too_big_lose_their_values_and_the_run_is_failed(tmp_path: Path) -> None:
    log = tmp_path / "combined.log"
    log.write_text("2026 task:a out hello\n")
    results = _results(a=_task("r" * LIMIT), b=_task({"small": True}))
    report = _fit(results, log)
    assert _sent(report) <= LIMIT and report["status"] == "failed"
    assert report["tasks"]["a"] == {**_task(None)} and report["tasks"]["b"]["result"] is None
    assert report["log"].startswith("2026 task:a out hello\n")
    assert "the tasks' results left out of this report" in report["log"]
    assert "in results.json on the node" in report["log"]


def test_tasks_too_many_to_send_are_left_out(tmp_path: Path) -> None:
    log = tmp_path / "combined.log"
    log.write_text("")
    tasks = {f"t{i}": _task(error={"type": "E", "message": "m" * 1000}) for i in range(400)}
    report = _fit(_results(**tasks), log)
    assert _sent(report) <= LIMIT
    assert (report["status"], report["tasks"]) == ("failed", {})
    assert "the tasks left out of this report" in report["log"]
