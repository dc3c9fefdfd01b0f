"""Cost of the combined log: a task printing N lines, captured vs. writing to /dev/null.

    python benchmarks/logcapture.py [--rounds 5] [--lines 200000]

- captured: the task runs under the executor (2 workers); its time is from the task's
  start to the executor's "finished" line, so the manager's reading, splitting, stamping
  and writing of every line is inside the figure.
- /dev/null: the same function in a plain Python process whose stdout is /dev/null
  (block-buffered, as Python is on any non-terminal), timed inside that process.

Rounds interleave the two; the summary prints medians and the ratio (goal: <= 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from executor.engine.manager import RunConfig, run  # noqa: E402
from executor.pipeline import load_pipeline  # noqa: E402

TASK_SOURCE = """
import time


def print_lines(ctx, count):
    for i in range(count):
        print("line", i, "of the benchmark output")
    return count
"""

DEVNULL_RUNNER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from bench import print_lines
started = time.perf_counter()
print_lines(None, int(sys.argv[2]))
sys.stdout.flush()
print(time.perf_counter() - started, file=sys.stderr)
"""


def _parse_time(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def captured_seconds(workdir: Path, name: str, lines: int) -> tuple[float, float]:
    """(task start -> executor's finished line, task start -> task end) in seconds."""
    root = workdir / "pipeline"
    log_path = workdir / f"{name}.log"
    config = RunConfig(workers=2, run_id=name, node_id="bench", log_path=log_path)
    results = run(load_pipeline(root), config)
    task = results["tasks"]["big"]
    assert task["result"] == lines, task
    started = _parse_time(task["started_at"])
    finish_line = next(
        line
        for line in log_path.read_text().splitlines()
        if " executor log task big attempt 1 succeeded" in line
    )
    return _parse_time(finish_line.split(" ", 1)[0]) - started, task["duration_s"]


def devnull_seconds(workdir: Path, lines: int) -> float:
    result = subprocess.run(
        [sys.executable, "-c", DEVNULL_RUNNER, str(workdir / "pipeline"), str(lines)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=True,
    )
    return float(result.stderr.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lines", type=int, default=200_000)
    args = parser.parse_args()
    captured, in_task, devnull = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-logcapture-") as tmp:
        workdir = Path(tmp)
        root = workdir / "pipeline"
        root.mkdir()
        (root / "bench.py").write_text(TASK_SOURCE)
        task = {"id": "big", "call": "bench:print_lines", "args": {"count": args.lines}}
        document = {"format": 1, "name": "logcapture", "tasks": [task]}
        (root / "pipeline.json").write_text(json.dumps(document))
        for index in range(args.rounds):
            end_to_end, task_only = captured_seconds(workdir, f"round{index}", args.lines)
            captured.append(end_to_end)
            in_task.append(task_only)
            devnull.append(devnull_seconds(workdir, args.lines))
            print(
                f"round {index + 1}/{args.rounds}: captured {end_to_end:.3f} s "
                f"(in task {task_only:.3f} s), /dev/null {devnull[-1]:.3f} s",
                file=sys.stderr,
            )
    c, t, d = (statistics.median(v) for v in (captured, in_task, devnull))
    print(f"\n{args.lines} lines, {args.rounds} rounds (medians)")
    print(f"captured, start to finished line: {c:.3f} s  ({args.lines / c:,.0f} lines/s)")
    print(f"captured, inside the task:        {t:.3f} s")
    print(f"/dev/null:                        {d:.3f} s  ({args.lines / d:,.0f} lines/s)")
    print(f"ratio captured / /dev/null:       {c / d:.2f}  (goal <= 2)")


if __name__ == "__main__":
    main()
