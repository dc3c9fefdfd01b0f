"""The combined log as it goes into the report.

The server refuses bodies over its limit (32 MiB by default), and a refused report would
never be delivered. A log larger than MAX_LOG_BYTES is therefore cut in the middle: its
first quarter and its end, joined by one executor line that says how much was left out.
The whole log stays on the node.
"""

from __future__ import annotations

from pathlib import Path

from executor.timefmt import now

MAX_LOG_BYTES = 16 * 1024 * 1024


def log_for_report(path: Path, limit: int = MAX_LOG_BYTES) -> str:
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
