"""DagState transitions, driven directly without processes."""

from __future__ import annotations

from pathlib import Path

from executor.engine.scheduler import DagState
from executor.pipeline import Pipeline, Task


def _pipeline(*specs: tuple[str, tuple[str, ...], int, str]) -> Pipeline:
    tasks = {
        task_id: Task(task_id, "m:f", {}, after, retries, 0.5, None, trigger)
        for task_id, after, retries, trigger in specs
    }
    return Pipeline(name="p", root=Path("/"), tasks=tasks, source=Path("/"))


def _run_ok(state: DagState, task_id: str, result: str = "1") -> list[str]:
    assert state.ready.popleft() == task_id
    state.start(task_id, 1.0)
    return state.succeeded(task_id, result, 1.0, 2.0)


def test_diamond_releases_tasks_when_their_last_upstream_ends() -> None:
    state = DagState(
        _pipeline(
            ("a", (), 0, "all_success"),
            ("b", ("a",), 0, "all_success"),
            ("c", ("a",), 0, "all_success"),
            ("d", ("b", "c"), 0, "all_success"),
        )
    )
    assert list(state.ready) == ["a"]
    _run_ok(state, "a", '"A"')
    assert list(state.ready) == ["b", "c"]
    _run_ok(state, "b", "2")
    assert list(state.ready) == ["c"]
    _run_ok(state, "c", "3")
    assert list(state.ready) == ["d"]
    assert state.upstream_json("d") == {"b": "2", "c": "3"}
    _run_ok(state, "d")
    assert state.done
    assert state.counts() == {"succeeded": 4}


def test_retry_delay_doubles_then_the_task_fails_and_propagates() -> None:
    state = DagState(
        _pipeline(
            ("a", (), 2, "all_success"),
            ("b", ("a",), 0, "all_success"),
            ("c", ("b",), 0, "all_success"),
            ("d", ("a", "c"), 0, "all_done"),
        )
    )
    error = {"type": "E", "message": "m", "traceback": "t"}
    delays = []
    for _ in range(2):
        task_id = state.ready.popleft()
        state.start(task_id, 0.0)
        delay, skipped = state.attempt_failed(task_id, error, 0.0, 1.0)
        delays.append(delay)
        assert skipped == [] and not state.ready
        assert state.records["a"].status == "retry_wait"
        state.retry_due("a")
    assert delays == [0.5, 1.0]
    state.ready.popleft()
    assert state.start("a", 5.0) == 3
    delay, skipped = state.attempt_failed("a", error, 5.0, 6.0)
    assert delay is None and skipped == ["b", "c"]
    assert list(state.ready) == ["d"]
    assert state.upstream_json("d") == {"a": None, "c": None}
    record = state.records["a"]
    assert (record.status, record.attempts, record.started_at, record.finished_at) == (
        "failed",
        3,
        0.0,
        6.0,
    )
    assert state.records["c"].blocked_by == ["b"]
    assert state.records["c"].attempts == 0


def test_success_after_a_retry_keeps_the_first_start() -> None:
    state = DagState(_pipeline(("a", (), 1, "all_success")))
    state.ready.popleft()
    state.start("a", 10.0)
    state.attempt_failed("a", {"type": "E", "message": "", "traceback": ""}, 10.5, 11.0)
    state.retry_due("a")
    state.ready.popleft()
    state.start("a", 12.0)
    state.succeeded("a", "7", 12.1, 13.0)
    record = state.records["a"]
    assert (record.started_at, record.finished_at, record.result_json) == (10.5, 13.0, "7")


def test_cancel_ends_every_unfinished_task() -> None:
    state = DagState(
        _pipeline(
            ("a", (), 0, "all_success"),
            ("b", (), 0, "all_success"),
            ("c", ("a",), 0, "all_success"),
        )
    )
    _run_ok(state, "a")
    state.ready.popleft()
    state.start("b", 3.0)
    assert state.cancel_unfinished(4.0) == ["b", "c"]
    assert state.done and not state.ready
    assert state.records["b"].finished_at == 4.0
    assert state.records["c"].finished_at is None
    assert state.counts() == {"succeeded": 1, "cancelled": 2}


def test_retry_due_after_cancel_does_nothing() -> None:
    state = DagState(_pipeline(("a", (), 1, "all_success")))
    state.ready.popleft()
    state.start("a", 0.0)
    state.attempt_failed("a", {"type": "E", "message": "", "traceback": ""}, 0.0, 1.0)
    state.cancel_unfinished(2.0)
    state.retry_due("a")
    assert not state.ready and state.records["a"].status == "cancelled"


def test_unstart_puts_the_task_first_in_line_without_counting_the_attempt() -> None:
    state = DagState(_pipeline(("a", (), 0, "all_success"), ("b", (), 0, "all_success")))
    state.ready.popleft()
    assert state.start("a", 1.0) == 1
    state.unstart("a")
    assert list(state.ready) == ["a", "b"]
    record = state.records["a"]
    assert (record.status, record.attempts, record.started_at) == ("ready", 0, None)
    state.ready.popleft()
    assert state.start("a", 2.0) == 1
