"""A run owns its processes: a dead worker is noticed at once, whatever its task left
holding its pipes, and nothing the run started outlives it (daemons included)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from executor.engine.leftovers import Leftovers, children
from tests.integration.executor_pipelines import make_pipeline, run_pipeline, statuses, task
from tests.processes import process_alive

pytestmark = pytest.mark.timeout(300)
START_METHODS = ["fork", "forkserver"]


def pid_in(path: Path) -> int:
    return int(path.read_text())


@pytest.mark.parametrize("how", ["exit", "sigkill"])
@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_dead_worker_is_noticed_while_its_child_holds_the_pipes(
    tmp_path: Path, start_method: str, how: str
) -> None:
    pidfile = tmp_path / "child.pid"
    pipeline = make_pipeline(
        tmp_path / "p",
        [task("dies", "die_leaving_child", args={"pidfile": str(pidfile), "how": how})],
    )
    started = time.monotonic()
    results, log = run_pipeline(pipeline, tmp_path, start_method=start_method)
    assert time.monotonic() - started < 60, "not when the child (300 s) exits"
    assert statuses(results) == {"dies": "failed"}
    assert results["tasks"]["dies"]["error"]["type"] == "WorkerCrashed"
    assert not process_alive(pid_in(pidfile)), "the task's child went with its worker"


@pytest.mark.parametrize("start_method", START_METHODS)
def test_a_daemon_a_task_started_does_not_outlive_the_run(
    tmp_path: Path, start_method: str
) -> None:
    pidfile = tmp_path / "daemon.pid"
    pipeline = make_pipeline(
        tmp_path / "p",
        [task("daemon", "daemonize", args={"pidfile": str(pidfile)}), task("after", "add")],
    )
    results, log = run_pipeline(pipeline, tmp_path, start_method=start_method)
    assert statuses(results) == {"daemon": "succeeded", "after": "succeeded"}
    assert not process_alive(pid_in(pidfile)), "the daemon was killed when the run ended"
    assert "the run left behind" in log


def test_children_from_before_the_run_are_left_alone(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with Leftovers(lambda text: None) as leftovers:
            pass
        assert leftovers.kill() == [] and process_alive(sleeper.pid)
        assert sleeper.pid in children(os.getpid())
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_process_started_inside_is_killed_and_reaped(tmp_path: Path) -> None:
    reported: list[str] = []
    with Leftovers(reported.append):
        inside = subprocess.Popen(["sleep", "60"])
    assert not process_alive(inside.pid)
    assert reported and str(inside.pid) in reported[0]
    inside.wait()  # already reaped: Popen learns it without a warning
