"""The engine against real worker processes: DAG shapes, retries, timeouts, crashes,
cancellation, archives, start methods, store/events and deadlock detection."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

import pytest

from executor.engine.malloc import MMAP_THRESHOLD
from executor.engine.manager import RunConfig, run
from executor.pack import pack
from executor.pipeline import load_pipeline
from tests.integration.executor_pipelines import (
    make_pipeline,
    run_pipeline,
    statuses,
    task,
)
from tests.processes import process_alive

TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


def test_diamond_passes_results_downstream(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("top", "echo", args={"value": 1}),
            task("left", "echo", ["top"], args={"value": "l"}),
            task("right", "echo", ["top"], args={"value": "r"}),
            task("bottom", "echo", ["left", "right"]),
        ],
    )
    results, _ = run_pipeline(path, tmp_path)
    assert results["status"] == "succeeded"
    bottom = results["tasks"]["bottom"]["result"]
    assert bottom["upstream"]["left"]["value"] == "l"
    assert bottom["upstream"]["right"]["upstream"]["top"]["value"] == 1
    for entry in results["tasks"].values():
        assert entry["attempts"] == 1 and entry["error"] is None
        assert re.fullmatch(TIME, entry["started_at"]) and re.fullmatch(TIME, entry["finished_at"])
        assert entry["duration_s"] >= 0
    assert set(results) == {
        "run_id",
        "node_id",
        "pipeline",
        "status",
        "started_at",
        "finished_at",
        "tasks",
        "log_path",
    }
    assert (results["run_id"], results["node_id"], results["pipeline"]) == (
        "test-run",
        "test-node",
        "test",
    )


def test_long_chain_runs_in_order(tmp_path: Path) -> None:
    tasks = [task("t0", "add")] + [task(f"t{i}", "add", [f"t{i - 1}"]) for i in range(1, 300)]
    results, log = run_pipeline(make_pipeline(tmp_path / "p", tasks), tmp_path, workers=2)
    assert results["tasks"]["t299"]["result"] == 300
    starts = [results["tasks"][f"t{i}"]["started_at"] for i in range(300)]
    assert starts == sorted(starts)
    assert log.count(" succeeded: ") == 300


def test_wide_fan_out_uses_every_worker(tmp_path: Path) -> None:
    tasks = [task("root", "echo")] + [task(f"w{i}", "fields", ["root"]) for i in range(400)]
    tasks.append(task("join", "echo", [f"w{i}" for i in range(400)]))
    results, _ = run_pipeline(make_pipeline(tmp_path / "p", tasks), tmp_path, workers=3)
    assert results["status"] == "succeeded"
    pids = {results["tasks"][f"w{i}"]["result"][4] for i in range(400)}
    assert len(pids) == 3
    assert len(results["tasks"]["join"]["result"]["upstream"]) == 400


def test_ctx_fields_and_hidden_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXECUTOR_TOKEN", "secret")
    monkeypatch.setenv("EXECUTOR_MASTER_URL", "http://127.0.0.1:1")
    path = make_pipeline(
        tmp_path / "p",
        [
            task("f", "fields"),
            task("token", "env", args={"name": "EXECUTOR_TOKEN"}),
            task("url", "env", args={"name": "EXECUTOR_MASTER_URL"}),
        ],
    )
    results, _ = run_pipeline(path, tmp_path)
    assert results["tasks"]["f"]["result"][:4] == ["f", 1, "test-run", "test-node"]
    assert results["tasks"]["token"]["result"] is None
    assert results["tasks"]["url"]["result"] == "http://127.0.0.1:1"


def test_retry_then_succeed_with_doubling_delay(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [task("f", "flaky", args={"succeed_on": 3}, retries=3, retry_delay=0.05)],
    )
    results, log = run_pipeline(path, tmp_path)
    entry = results["tasks"]["f"]
    assert (entry["status"], entry["attempts"], entry["result"]) == ("succeeded", 3, 3)
    assert entry["error"] is None
    assert "attempt 1 failed, retrying in 0.05 s" in log
    assert "attempt 2 failed, retrying in 0.1 s" in log


def test_retries_exhausted_propagate_upstream_failed_while_all_done_runs(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("bad", "fail", retries=1, retry_delay=0.01),
            task("good", "echo", args={"value": 2}),
            task("child", "echo", ["bad"]),
            task("grandchild", "echo", ["child"]),
            task("report", "echo", ["bad", "good", "grandchild"], trigger="all_done"),
        ],
    )
    results, _ = run_pipeline(path, tmp_path)
    assert results["status"] == "failed"
    assert statuses(results) == {
        "bad": "failed",
        "good": "succeeded",
        "child": "upstream_failed",
        "grandchild": "upstream_failed",
        "report": "succeeded",
    }
    bad = results["tasks"]["bad"]
    assert bad["attempts"] == 2
    assert bad["error"]["type"] == "ValueError" and bad["error"]["message"] == "always fails"
    assert 'raise ValueError("always fails")' in bad["error"]["traceback"]
    child = results["tasks"]["child"]
    assert child["attempts"] == 0 and child["started_at"] is None and child["duration_s"] is None
    assert child["error"]["type"] == "UpstreamFailed"
    upstream = results["tasks"]["report"]["result"]["upstream"]
    assert upstream["bad"] is None and upstream["grandchild"] is None
    assert upstream["good"]["value"] == 2


def test_non_json_result_fails_with_type_error(tmp_path: Path) -> None:
    results, _ = run_pipeline(make_pipeline(tmp_path / "p", [task("s", "not_json")]), tmp_path)
    error = results["tasks"]["s"]["error"]
    assert error["type"] == "TypeError" and "not JSON-serializable" in error["message"]


def test_timeout_kills_the_grandchild_and_the_worker_is_replaced(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    path = make_pipeline(
        tmp_path / "p",
        [
            task("slow", "sleep_with_grandchild", args={"pidfile": str(pidfile)}, timeout=1),
            task("after", "echo", ["slow"], trigger="all_done"),
        ],
    )
    results, _ = run_pipeline(path, tmp_path, workers=1)
    slow = results["tasks"]["slow"]
    assert slow["status"] == "failed"
    assert slow["error"]["type"] == "TimeoutError" and "timeout of 1 s" in slow["error"]["message"]
    assert results["tasks"]["after"]["status"] == "succeeded"
    assert not process_alive(int(pidfile.read_text()))


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        ("crash_sigkill", "killed by signal SIGKILL (9)"),
        ("crash_segfault", "killed by signal SIGSEGV (11)"),
        ("crash_exit", "exited with code 7"),
    ],
)
def test_worker_crash_fails_the_task_and_the_run_goes_on(
    tmp_path: Path, call: str, expected: str
) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("crash", call, retries=1, retry_delay=0),
            task("after", "echo", ["crash"], trigger="all_done"),
            task("independent", "echo"),
        ],
    )
    results, log = run_pipeline(path, tmp_path, workers=1)
    crash = results["tasks"]["crash"]
    assert (crash["status"], crash["attempts"]) == ("failed", 2)
    assert crash["error"]["type"] == "WorkerCrashed"
    assert expected in crash["error"]["message"]
    assert statuses(results)["after"] == statuses(results)["independent"] == "succeeded"


def test_sigterm_cancels_running_and_pending_tasks(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    path = make_pipeline(
        tmp_path / "p",
        [
            task("slow", "sleep_with_grandchild", args={"pidfile": str(pidfile)}),
            task("killer", "cancel_run", args={"pidfile": str(pidfile), "ignore_term": True}),
            task("pending", "echo", ["slow"]),
        ],
    )
    previous = signal.getsignal(signal.SIGTERM)
    results, log = run_pipeline(path, tmp_path, workers=2, grace_s=0.5)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert results["status"] == "cancelled"
    assert statuses(results) == {"slow": "cancelled", "killer": "cancelled", "pending": "cancelled"}
    assert results["tasks"]["pending"]["attempts"] == 0
    assert results["tasks"]["slow"]["attempts"] == 1
    assert "received SIGTERM: cancelling the run (2 running, 1 not started)" in log
    assert not process_alive(int(pidfile.read_text()))


def test_runs_from_a_packed_archive(tmp_path: Path) -> None:
    source = make_pipeline(tmp_path / "p", [task("a", "echo", args={"value": 5})])
    archive = tmp_path / "p.tar.gz"
    pack(source, archive)
    results, _ = run_pipeline(archive, tmp_path)
    assert results["tasks"]["a"]["result"]["value"] == 5


def test_forkserver_start_method(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [task("a", "add"), task("b", "add", ["a"]), task("c", "crash_exit", ["b"])],
    )
    results, _ = run_pipeline(path, tmp_path, start_method="forkserver")
    assert results["tasks"]["b"]["result"] == 2
    assert "exited with code 7" in results["tasks"]["c"]["error"]["message"]


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_workers_keep_freed_memory_of_big_blocks_for_reuse(tmp_path: Path, method: str) -> None:
    size = MMAP_THRESHOLD - (1 << 20)  # by default glibc maps (and unmaps) such a block
    path = make_pipeline(tmp_path / "p", [task("t", "freed_heap_after", args={"size": size})])
    results, _ = run_pipeline(path, tmp_path, start_method=method)
    assert results["tasks"]["t"]["result"] >= size


def test_store_is_shared_by_all_workers(tmp_path: Path) -> None:
    incrs = [task(f"i{n}", "store_incr", args={"key": "k", "times": 200}) for n in range(4)]
    reader = task("read", "store_read", [f"i{n}" for n in range(4)], args={"key": "k"})
    results, _ = run_pipeline(make_pipeline(tmp_path / "p", [*incrs, reader]), tmp_path)
    assert results["tasks"]["read"]["result"] == 800


def test_a_tasks_writes_are_visible_to_the_next_task_on_another_worker(tmp_path: Path) -> None:
    # Writes are not answered one by one: the worker waits for them to be applied
    # before it reports the task finished.
    for attempt in range(5):
        prefix = f"w{attempt}-"
        path = make_pipeline(
            tmp_path / f"p{attempt}",
            [
                task("write", "store_write_many", args={"prefix": prefix, "count": 2000}),
                task("read", "store_read_many", ["write"], args={"prefix": prefix, "count": 2000}),
            ],
        )
        results, _ = run_pipeline(path, tmp_path, workers=2)
        assert results["tasks"]["read"]["result"] == list(range(2000))


def test_events_between_tasks_and_lifecycle_topics(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("waiter", "wait_event", args={"topic": "go", "timeout": 60}),
            task("publisher", "publish_event", args={"topic": "go", "payload": {"x": 1}}),
            task("watch", "lifecycle_watcher", ["publisher"], args={"task_id": "publisher"}),
        ],
    )
    results, _ = run_pipeline(path, tmp_path, workers=2)
    assert results["tasks"]["waiter"]["result"] == {"x": 1}
    finished: dict[str, Any] = results["tasks"]["watch"]["result"]
    assert set(finished) == {"task_id", "attempt", "status"}
    assert finished["status"] == "succeeded"


def test_lifecycle_events_reach_the_first_task_that_uses_events(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("a", "add"),
            task("b", "fail", ["a"]),
            task("watch", "lifecycle_watcher", ["b"], args={"task_id": "b"}, trigger="all_done"),
        ],
    )
    results, _ = run_pipeline(path, tmp_path, workers=1)
    assert results["tasks"]["watch"]["result"] == {
        "task_id": "a",
        "attempt": 1,
        "status": "succeeded",
    }


def test_deadlock_of_waiting_tasks_fails_clearly(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p",
        [
            task("w1", "wait_event", args={"topic": "never"}),
            task("w2", "wait_event", args={"topic": "nobody"}),
            task("pub", "publish_event", ["w1"], args={"topic": "never", "payload": 1}),
        ],
    )
    results, log = run_pipeline(path, tmp_path, workers=2, deadlock_grace_s=0.2)
    for waiter in ("w1", "w2"):
        error = results["tasks"][waiter]["error"]
        assert error["type"] == "EventDeadlock"
        assert "all 2 workers" in error["message"] and "never, nobody" in error["message"]
    assert statuses(results)["pub"] == "upstream_failed"
    assert "deadlock: all 2 workers were blocked" in log


def test_tasks_queued_behind_a_waiter_are_given_back(tmp_path: Path) -> None:
    # Short busy tasks make the engine queue tasks behind running ones. The waiters run
    # one after the other (so 2 workers are enough); each one's publisher becomes ready
    # with it and may be queued behind it: it must then be given back and run elsewhere.
    busy = [task(f"w{i}", "add") for i in range(300)]
    pairs = [task("wait0", "wait_event", args={"topic": "go0"})]
    pairs.append(task("pub0", "publish_event", args={"topic": "go0", "payload": 0}))
    for n in range(1, 6):
        pairs += [
            task(f"wait{n}", "wait_event", [f"wait{n - 1}"], args={"topic": f"go{n}"}),
            task(
                f"pub{n}", "publish_event", [f"wait{n - 1}"], args={"topic": f"go{n}", "payload": n}
            ),
        ]
    path = make_pipeline(tmp_path / "p", [*busy[:100], *pairs, *busy[100:]])
    results, _ = run_pipeline(path, tmp_path, workers=2, deadlock_grace_s=5)
    assert results["status"] == "succeeded", {
        t: e["error"] for t, e in results["tasks"].items() if e["error"]
    }
    for n in range(6):
        assert results["tasks"][f"wait{n}"]["result"] == n
    assert all(entry["attempts"] == 1 for entry in results["tasks"].values())


def test_tasks_queued_behind_a_crash_run_unharmed(tmp_path: Path) -> None:
    tasks = [task(f"a{i}", "add") for i in range(100)]
    tasks += [task(f"crash{i}", "crash_exit") for i in range(3)]
    tasks += [task(f"b{i}", "add") for i in range(100)]
    results, _ = run_pipeline(make_pipeline(tmp_path / "p", tasks), tmp_path, workers=2)
    for task_id, entry in results["tasks"].items():
        if task_id.startswith("crash"):
            assert entry["error"]["type"] == "WorkerCrashed"
        else:
            assert (entry["status"], entry["attempts"]) == ("succeeded", 1), task_id


def test_prefetch_can_be_turned_off(tmp_path: Path) -> None:
    tasks = [task(f"t{i}", "add") for i in range(100)]
    _, log = run_pipeline(make_pipeline(tmp_path / "p", tasks), tmp_path, prefetch=False)
    assert "queued behind" not in log


def test_a_timed_wait_is_not_a_deadlock(tmp_path: Path) -> None:
    path = make_pipeline(
        tmp_path / "p", [task("w", "wait_event", args={"topic": "never", "timeout": 1.5})]
    )
    results, _ = run_pipeline(path, tmp_path, workers=1, deadlock_grace_s=0.2)
    assert results["tasks"]["w"]["error"]["type"] == "TimeoutError"


def test_progress_is_reported_after_each_task(tmp_path: Path) -> None:
    tasks = [task("a", "add"), task("b", "add", ["a"]), task("c", "fail", ["a"])]
    tasks.append(task("d", "add", ["c"]))
    seen: list[tuple[int, int]] = []
    config = RunConfig(
        workers=8, run_id="r", node_id="n", log_path=tmp_path / "log", results_path=None
    )
    pipeline = load_pipeline(make_pipeline(tmp_path / "p", tasks))
    results = run(pipeline, config, lambda done, total: seen.append((done, total)))
    assert results["status"] == "failed"
    assert seen[-1] == (4, 4)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert "with 4 workers" in (tmp_path / "log").read_text()


def test_a_failing_progress_callback_does_not_end_the_run(tmp_path: Path) -> None:
    def broken(done: int, total: int) -> None:
        raise RuntimeError("heartbeat down")

    config = RunConfig(workers=1, run_id="r", node_id="n", log_path=tmp_path / "log")
    tasks = [task("a", "add"), task("b", "add", ["a"])]
    results = run(load_pipeline(make_pipeline(tmp_path / "p", tasks)), config, broken)
    assert results["status"] == "succeeded"
    assert (
        "progress callback failed, disabled: RuntimeError('heartbeat down')"
        in (tmp_path / "log").read_text()
    )


def test_no_worker_outlives_the_run(tmp_path: Path) -> None:
    path = make_pipeline(tmp_path / "p", [task("a", "fields"), task("b", "fields")])
    results, _ = run_pipeline(path, tmp_path)
    for entry in results["tasks"].values():
        assert not process_alive(entry["result"][4])
