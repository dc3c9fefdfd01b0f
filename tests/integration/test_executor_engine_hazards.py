"""The engine where its processes race each other: a task batch bigger than the task pipe
while the task prints more than its output pipe holds, a timeout that fires before a
forkserver or spawn worker has made its process group, and a service stop that signals
the manager and its workers at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.executor_pipelines import make_pipeline, run_pipeline, statuses, task
from tests.processes import process_alive

EXECUTOR = [sys.executable, "-m", "executor"]

HAZARD_CODE = r"""
import os
import time


def numbers(ctx, count):
    return list(range(count))


def chatty(ctx, lines):
    for n in range(lines):
        print("row", n, "of", len(ctx.upstream["src"]), "-" * 40)
    return n


def sleep_noting_pid(ctx, piddir, seconds=60):
    path = os.path.join(piddir, ctx.task_id)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(path + ".tmp", path)
    time.sleep(seconds)
"""


def _hazard(task_id: str, call: str, after: tuple[str, ...] = (), **fields: Any) -> dict[str, Any]:
    """A task entry calling ``call`` in HAZARD_CODE."""
    return {**task(task_id, call, after, **fields), "call": f"hazards:{call}"}


def _hazard_pipeline(root: Path, tasks: list[dict[str, Any]]) -> Path:
    path = make_pipeline(root, tasks)
    (path / "hazards.py").write_text(HAZARD_CODE)
    return path


def _executor_run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``executor run``; on a timeout kill it (its workers die with it) and fail."""
    with subprocess.Popen(
        [*EXECUTOR, "run", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            pytest.fail(f"executor run did not end in {timeout} s: {argv}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_prefetched_batch_bigger_than_the_pipe_does_not_stall_a_chatty_task(
    tmp_path: Path,
) -> None:
    # Each queued task carries src's ~30 KB result: the batch queued behind chatty (first
    # in line) is far over the 64 KiB task pipe, and chatty prints ~100 KB before it reads
    # its next task.
    path = _hazard_pipeline(
        tmp_path / "p",
        [
            _hazard("src", "numbers", args={"count": 6000}),
            _hazard("chatty", "chatty", ("src",), args={"lines": 2000}),
            *(_hazard(f"fan{i}", "numbers", ("src",), args={"count": 1}) for i in range(12)),
        ],
    )
    log, results = tmp_path / "log", tmp_path / "results.json"
    result = _executor_run(
        [str(path), "--workers", "1", "--log", str(log), "--results", str(results)], timeout=60
    )
    assert result.returncode == 0, result.stderr
    text = log.read_text()
    assert "(queued behind chatty)" in text  # the batch was prefetched behind it
    assert text.count("task:chatty out row ") == 2000
    assert set(statuses(json.loads(results.read_text())).values()) == {"succeeded"}


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_a_timeout_before_the_worker_made_its_process_group_still_kills_it(
    tmp_path: Path, method: str
) -> None:
    # 10 ms: the worker has not reached its own setpgid (spawn and forkserver workers
    # import the engine first), so there is no process group to kill yet.
    args = {"pidfile": str(tmp_path / "gc"), "seconds": 8}
    path = make_pipeline(
        tmp_path / "p",
        [
            task("slow", "sleep_with_grandchild", args=args, timeout=0.01),
            task("after", "echo", ["slow"], trigger="all_done"),
        ],
    )
    began = time.monotonic()
    results, _ = run_pipeline(path, tmp_path, workers=1, start_method=method)
    assert time.monotonic() - began < 6  # not the task's 8 s
    slow = results["tasks"]["slow"]
    assert slow["status"] == "failed", slow
    assert slow["error"]["type"] == "TimeoutError"
    assert results["tasks"]["after"]["status"] == "succeeded"
    if (tmp_path / "gc").exists():  # the task got as far as starting its child
        assert not process_alive(int((tmp_path / "gc").read_text()))


def test_a_service_stop_signalling_every_process_cancels_the_run(tmp_path: Path) -> None:
    """As systemd stops a unit: SIGTERM (and SIGCONT) to the manager and each worker at
    once. The manager is stopped meanwhile so that it sees its signal and the workers'
    deaths in one wake-up, as on a busy machine."""
    piddir = tmp_path / "pids"
    piddir.mkdir()
    args = {"piddir": str(piddir)}
    path = _hazard_pipeline(
        tmp_path / "p",
        [
            _hazard("a", "sleep_noting_pid", args=args, retries=2, retry_delay=0),
            _hazard("b", "sleep_noting_pid", args=args),
            _hazard("c", "sleep_noting_pid", ("a",), args=args),
        ],
    )
    log, results_path = tmp_path / "log", tmp_path / "results.json"
    argv = [*EXECUTOR, "run", str(path), "--workers", "2", "--start-method", "forkserver"]
    argv += ["--log", str(log), "--results", str(results_path)]
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as manager:
        try:
            deadline = time.monotonic() + 120
            while len(list(piddir.glob("[ab]"))) < 2:
                assert manager.poll() is None and time.monotonic() < deadline, manager.stderr
                time.sleep(0.02)
            workers = [int((piddir / name).read_text()) for name in ("a", "b")]
            manager.send_signal(signal.SIGSTOP)
            manager.send_signal(signal.SIGTERM)
            for pid in workers:
                os.kill(pid, signal.SIGTERM)
            while any(process_alive(pid) for pid in workers):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            manager.send_signal(signal.SIGCONT)
            _, stderr = manager.communicate(timeout=60)
        finally:
            if manager.poll() is None:
                manager.kill()
                manager.wait()
    assert manager.returncode == 1, stderr
    results = json.loads(results_path.read_text())
    assert results["status"] == "cancelled"
    assert statuses(results) == {"a": "cancelled", "b": "cancelled", "c": "cancelled"}
    assert [results["tasks"][t]["attempts"] for t in "abc"] == [1, 1, 0]
    text = log.read_text()
    assert "received SIGTERM: cancelling the run (2 running, 1 not started)" in text
    for symptom in ("WorkerCrashed", "retrying", "Traceback"):
        assert symptom not in text
    assert sorted(p.name for p in piddir.iterdir()) == ["a", "b"]  # nothing started again
