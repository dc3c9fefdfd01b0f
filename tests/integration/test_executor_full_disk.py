"""A disk that fills up during a run, for real: a small tmpfs in a private mount namespace
(`unshare -m`, needs root), filled by a task that frees it again a moment later. The run
goes on, the combined log loses only what could not be written and says so, and the agent
delivers every result with its exit code 4."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.services_harness import BIN, ServerProcess

pytestmark = pytest.mark.timeout(600)

LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z (executor|task:[\w.-]+) (out|err|log) ")
LOST = re.compile(r"executor err \[\d+ bytes of the combined log lost: No space left on device\]")

FILL_TASKS = """
import os, time


def fill(ctx, path):
    try:  # a task that fills the disk the log lives on (its own data, a cache...)
        with open(path, "wb") as f:
            while True:
                f.write(bytes(65536))
    except OSError as exc:
        for _ in range(300):
            print("disk full:", exc, "x" * 100, flush=True)
    time.sleep(0.3)  # the disk stays full for a moment
    os.unlink(path)
    return "survived"


def last(ctx):
    time.sleep(1.5)  # past the log's retry pause: its lines are written again
    print("after the disk was freed", flush=True)
    return "last"
"""


def _fill_pipeline(directory: Path, blob: Path) -> Path:
    directory.mkdir()
    tasks = [
        {"id": "fill", "call": "filltasks:fill", "args": {"path": str(blob)}},
        {"id": "last", "call": "filltasks:last", "after": ["fill"]},
    ]
    (directory / "pipeline.json").write_text(
        json.dumps({"format": 1, "name": "fillup", "tasks": tasks})
    )
    (directory / "filltasks.py").write_text(FILL_TASKS)
    return directory


def _in_private_tmpfs(
    mountpoint: Path, argv: list[str], keep: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run `argv` with a 2 MiB tmpfs on `mountpoint`, visible only to it (a private mount
    namespace: nothing is left mounted), then copy the tmpfs into `keep`."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    script = (
        'mount -t tmpfs -o size=2m,mode=0755 tmpfs "$1" || exit 97; shift; '
        'keep="$1"; shift; "$@"; rc=$?; cp -a "$MOUNTPOINT/." "$keep/"; exit $rc'
    )
    keep.mkdir()
    namespace = ["unshare", "-m", "--propagation", "private"]
    result = subprocess.run(
        [*namespace, "sh", "-c", script, "sh", str(mountpoint), str(keep), *argv],
        env={**env, "MOUNTPOINT": str(mountpoint)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs in a private namespace: {result.stderr.strip()}")
    return result


def _check_lines(log: str) -> None:
    """Whole records only: a write cut short by the full disk left no half line."""
    bad = [line for line in log.splitlines() if not LINE.match(line)]
    assert not bad, bad[:3]


def test_a_run_survives_its_log_disk_filling_up(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    pipeline = _fill_pipeline(tmp_path / "p", disk / "blob")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    argv = [str(BIN / "executor"), "run", "--workers", "2", "--log", str(disk / "run.log")]
    result = _in_private_tmpfs(disk, [*argv, "--json", str(pipeline)], tmp_path / "kept", env)
    assert result.returncode == 4, result.stderr  # every task succeeded; the log is cut
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"Error: {disk / 'run.log'}: the combined log is incomplete: No space left on device"
    )
    results = json.loads(result.stdout)
    assert results["status"] == "succeeded"
    assert {k: v["result"] for k, v in results["tasks"].items()} == {
        "fill": "survived",
        "last": "last",
    }
    assert "cannot write the combined log" in result.stderr and "Traceback" not in result.stderr
    log = (tmp_path / "kept" / "run.log").read_text()
    _check_lines(log)
    assert LOST.search(log), log[-2000:]
    assert log.index("executor err [") < log.index("after the disk was freed")


def test_the_agent_delivers_every_result_when_its_disk_fills_up(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = ServerProcess(tmp_path / "server")
    server.workdir.mkdir()
    request.addfinalizer(server.stop)
    server.start()
    state = tmp_path / "state"
    state.mkdir()
    pipeline = _fill_pipeline(tmp_path / "p", state / "blob")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env.update(
        EXECUTOR_NODE_ID="node-a",
        EXECUTOR_RUN_ID="run-full",
        EXECUTOR_MASTER_URL=f"http://127.0.0.1:{server.port}",
        EXECUTOR_TOKEN=server.node_token("node-a"),
        EXECUTOR_PIPELINE=str(pipeline),
        EXECUTOR_STATE_DIR=str(state),
        EXECUTOR_HEARTBEAT_S="0.5",
        EXECUTOR_WORKERS="2",
    )
    result = _in_private_tmpfs(state, [str(BIN / "executor"), "agent"], tmp_path / "kept", env)
    assert result.returncode == 4, result.stderr[-3000:]  # the documented "state lost" code
    assert result.stdout.splitlines()[-1] == (
        "EXECUTOR-STATUS node=node-a run=run-full state=succeeded"
    )
    assert "Traceback" not in result.stderr
    [row] = server.rows("reports")
    stored: dict[str, Any] = {**json.loads(row[7]), "log": row[8]}
    assert stored["status"] == "succeeded"
    assert {k: v["status"] for k, v in stored["tasks"].items()} == {
        "fill": "succeeded",
        "last": "succeeded",
    }
    _check_lines(stored["log"])
    assert LOST.search(stored["log"])
    mark = "[the combined log is truncated: cannot write the combined log: No space left on device]"
    assert stored["log"].rstrip().endswith(mark)
