"""The combined log against real workers: every output source, volume, crashes, order."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from executor.engine.combined_log import CombinedLog
from tests.integration.executor_pipelines import make_pipeline, run_pipeline, task

LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (executor|task:\S+) (out|err|log) (.*)")


def _records(log: str) -> list[tuple[str, str, str]]:
    records = []
    for line in log.splitlines():
        match = LINE.fullmatch(line)
        assert match, f"malformed log line: {line!r}"
        records.append((match[1], match[2], match[3]))
    return records


def test_every_output_source_arrives_with_its_stream_tag(tmp_path: Path) -> None:
    results, log = run_pipeline(make_pipeline(tmp_path / "p", [task("t", "all_sources")]), tmp_path)
    assert results["status"] == "succeeded"
    records = _records(log)
    mine = {(stream, text) for source, stream, text in records if source == "task:t"}
    expected = {
        ("out", "from print"),
        ("out", "from sys.stdout"),
        ("err", "from sys.stderr"),
        ("out", "from os.write 1"),
        ("err", "from os.write 2"),
        ("out", "from libc puts"),
        ("out", "from child out"),
        ("err", "from child err"),
        ("log", "INFO [executor.task] from ctx.log"),
        ("out", "partial at the end"),
    }
    assert expected <= mine


def test_capture_under_forkserver(tmp_path: Path) -> None:
    path = make_pipeline(tmp_path / "p", [task("t", "all_sources")])
    _, log = run_pipeline(path, tmp_path, start_method="forkserver")
    mine = {(stream, text) for source, stream, text in _records(log) if source == "task:t"}
    expected = {("out", "from libc puts"), ("err", "from child err"), ("out", "partial at the end")}
    assert expected <= mine


def test_finish_line_follows_everything_the_task_wrote(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [task("t", "all_sources"), task("u", "print_lines", ["t"], args={"count": 3000})],
    )
    _, log = run_pipeline(path, tmp_path)
    records = _records(log)
    for task_id, last_text in (("t", "partial at the end"), ("u", "line 2999")):
        finish = next(
            i
            for i, (source, _, text) in enumerate(records)
            if source == "executor" and text.startswith(f"task {task_id} attempt 1 succeeded")
        )
        output = [i for i, (source, _, _) in enumerate(records) if source == f"task:{task_id}"]
        assert output and max(output) < finish
        assert any(records[i][2] == last_text for i in output)


def test_200k_lines_from_one_task_all_arrive_in_order(tmp_path: Path) -> None:
    path = make_pipeline(tmp_path / "p", [task("big", "print_lines", args={"count": 200_000})])
    results, log = run_pipeline(path, tmp_path)
    assert results["tasks"]["big"]["result"] == 200_000
    lines = [text for source, stream, text in _records(log) if source == "task:big"]
    assert lines == [f"line {i}" for i in range(200_000)]


def test_two_tasks_printing_at_once_never_share_a_line(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("a", "print_lines", args={"count": 30_000, "tag": "aaaaaaaaaaaaaaaaaaaa"}),
            task("b", "print_lines", args={"count": 30_000, "tag": "bbbbbbbbbbbbbbbbbbbb"}),
        ],
    )
    _, log = run_pipeline(path, tmp_path, workers=2)
    for task_id, tag in (("a", "a" * 20), ("b", "b" * 20)):
        lines = [text for source, _, text in _records(log) if source == f"task:{task_id}"]
        assert lines == [f"{tag} {i}" for i in range(30_000)]


def test_a_task_breaking_its_streams_does_not_break_the_next(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("breaker", "break_streams"),
            task("next", "print_lines", ["breaker"], args={"count": 2}, trigger="all_done"),
        ],
    )
    results, log = run_pipeline(path, tmp_path, workers=1)
    assert results["tasks"]["breaker"]["error"]["message"] == "streams broken"
    records = _records(log)
    assert ("task:breaker", "err", "ValueError: streams broken") in records
    assert [text for source, _, text in records if source == "task:next"] == ["line 0", "line 1"]


def test_queued_tasks_output_is_attributed_to_the_right_task(tmp_path: Path) -> None:
    # Tiny tasks: the engine queues up to three behind the running one on each worker
    # (one capture slot each), and a queued task starts before the manager has read its
    # predecessor's last line.
    tasks = [task(f"t{i}", "print_own", args={"count": 3}) for i in range(400)]
    results, log = run_pipeline(make_pipeline(tmp_path / "p", tasks), tmp_path, workers=2)
    assert results["status"] == "succeeded"
    queued_behind = Counter(re.findall(r"queued behind (t\d+)\)", log))
    assert max(queued_behind.values()) >= 2, "never more than one task queued"
    seen: dict[str, list[str]] = {}
    for source, _, text in _records(log):
        if source.startswith("task:"):
            seen.setdefault(source[5:], []).append(text)
    for i in range(400):
        own = f"t{i}"
        assert seen[own] == [f"{own} 0", f"{own} 1", f"{own} 2", f"{own} partial"]


def test_crash_mid_line_keeps_the_partial_line_and_fails_the_task(tmp_path: Path) -> None:
    path = make_pipeline(tmp_path / "p", [task("c", "crash_mid_line")])
    results, log = run_pipeline(path, tmp_path)
    assert results["tasks"]["c"]["status"] == "failed"
    records = _records(log)
    mine = [(stream, text) for source, stream, text in records if source == "task:c"]
    assert mine == [("out", "complete line"), ("out", "partial line without newline")]
    last_output = max(i for i, record in enumerate(records) if record[0] == "task:c")
    failed = next(i for i, r in enumerate(records) if r[2].startswith("task c attempt 1 failed"))
    assert last_output < failed


def test_log_path_is_reported_and_agent_lines_append(tmp_path: Path) -> None:
    log_path = tmp_path / "combined.log"
    with CombinedLog(log_path) as log:
        log.executor("agent: before the run")
    results, text = run_pipeline(make_pipeline(tmp_path / "p", [task("t", "echo")]), tmp_path)
    with CombinedLog(log_path) as log:
        log.executor("agent: after the run\nsecond line")
    assert results["log_path"] == str(log_path)
    lines = log_path.read_text().splitlines()
    assert lines[0].endswith(" executor log agent: before the run")
    assert lines[-2].endswith(" executor log agent: after the run")
    assert lines[-1].endswith(" executor log second line")
    assert text.count("\n") == len(lines) - 2
