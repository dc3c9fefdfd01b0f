"""The report as it is sent: results and combined log, within the server's body limit.

The server refuses bodies over its limit (32 MiB by default), and a refused report would
be refused again at every start. So the report is measured as the JSON it is sent as,
where the log can grow up to six times (a control character is `\\u001b`):

- a log larger than MAX_LOG_BYTES on disk is cut in the middle first: its first quarter
  and its end, joined by one executor line that says how much was left out;
- a report still over MAX_REPORT_BYTES has its log cut the same way, further;
- results too big on their own (a task returned tens of MiB) lose the tasks' `result`
  values (else the tasks themselves), the run is reported `failed` (the master cannot
  check it), and a line in the log says so.

Everything stays on the node: the whole log, and the results in results.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from executor import jsontext
from executor.timefmt import now

MAX_LOG_BYTES = 16 * 1024 * 1024
MAX_REPORT_BYTES = 32 * 1024 * 1024
"""The server's default body limit (`imagefactory serve --max-body-bytes`)."""
LOG_SHARE = 32
"""Results must leave the log 1/LOG_SHARE of the limit (1 MiB); bigger ones are left out."""
_NOTES = 4096  # room for the lines that say what was left out

log = logging.getLogger("executor.agent.reportlog")


def log_for_report(path: Path, limit: int = MAX_LOG_BYTES) -> str:
    """The combined log at `path`, cut in the middle to `limit` bytes if it is larger."""
    size = path.stat().st_size
    if size <= limit:
        return path.read_text(encoding="utf-8", errors="replace")
    with path.open("rb") as f:
        head = f.read(limit // 4)
        f.seek(size - (limit - limit // 4))
        tail = f.read()
    head = head[: head.rfind(b"\n") + 1]  # whole lines only
    tail = tail[tail.find(b"\n") + 1 :]
    left_out = size - len(head) - len(tail)
    marker = (
        f"{now()} executor err [{left_out} bytes of the combined log left out of this report;"
        f" the whole log is {path} on the node]\n"
    )
    return (head + marker.encode() + tail).decode("utf-8", errors="replace")


def fit_report(
    results: Mapping[str, Any],
    log_text: str,
    recut: Callable[[int], str],
    limit: int = MAX_REPORT_BYTES,
) -> dict[str, Any]:
    """The report of `results` and `log_text`, no larger than `limit` bytes as JSON.

    `recut(n)` gives the log again, cut in the middle to `n` bytes of the file (so that
    the line saying how much was left out counts from the whole log)."""
    report = {**results, "log": log_text}
    if _encoded_size(report) <= limit:
        return report
    room = limit - _NOTES
    lean, note = _lean_results(results, room - limit // LOG_SHARE)
    budget = room - _encoded_size({**lean, "log": ""})
    text, size = log_text, _encoded_size(log_text)
    keep = len(log_text.encode("utf-8"))
    while size > budget and keep > 0:
        # The JSON form shrinks by about the same ratio as the file's part: aim a bit lower.
        keep = int(keep * budget / size * 0.95)
        text = recut(keep)
        size = _encoded_size(text)
    if note is not None:
        log.error("%s", note)
        text += f"{now()} executor err [{note}]\n"
    return {**lean, "log": text}


def _lean_results(results: Mapping[str, Any], room: int) -> tuple[dict[str, Any], str | None]:
    """`results` if they fit in `room` bytes, else without the tasks' results (then without
    the tasks), status failed, and the note that says so."""
    size = _encoded_size({**results, "log": ""})
    if size <= room:
        return dict(results), None
    tasks = results.get("tasks", {})
    lean = {**results, "status": "failed"}
    lean["tasks"] = {task: {**entry, "result": None} for task, entry in tasks.items()}
    left_out = "the tasks' results"
    if _encoded_size({**lean, "log": ""}) > room:
        lean["tasks"], left_out = {}, "the tasks"
    note = (
        f"{left_out} left out of this report (the results are {size} bytes as JSON, over "
        f"its limit of {room} bytes), so the run is reported failed; results left out of "
        f"this report are in results.json on the node"
    )
    return lean, note


def _encoded_size(value: Any) -> int:
    return len(jsontext.dumps(value).encode("utf-8"))
