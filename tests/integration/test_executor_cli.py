"""The ``executor`` command as a user runs it: exit codes, one-line errors, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.executor_pipelines import make_pipeline, task
from tests.processes import process_alive, signal_when

EXECUTOR = [sys.executable, "-m", "executor"]


def _executor(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EXECUTOR, *args], capture_output=True, text=True, timeout=300, env=env, check=False
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_run_validate_pack_happy_path(tmp_path: Path) -> None:
    source = make_pipeline(tmp_path / "p", [task("a", "add"), task("b", "add", ["a"])])
    assert _executor("validate", str(source)).stdout == "ok: pipeline test, 2 tasks\n"
    packed = _executor("pack", str(source), "-o", str(tmp_path / "p.tar.gz"))
    assert packed.returncode == 0 and len(packed.stdout.strip()) == 64
    env = dict(os.environ, EXECUTOR_STATE_DIR=str(tmp_path / "state"), EXECUTOR_RUN_ID="r1")
    result = _executor(
        "run", str(tmp_path / "p.tar.gz"), "--workers", "2", "--results", str(tmp_path / "r.json"),
        env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("run r1 succeeded: 2 succeeded; log: ")
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["tasks"]["b"]["result"] == 2
    assert results["log_path"] == str(tmp_path / "state" / "logs" / "r1.log")
    assert "task b attempt 1 succeeded" in Path(results["log_path"]).read_text()


def test_failed_run_exits_1_and_json_prints_results(tmp_path: Path) -> None:
    source = make_pipeline(tmp_path / "p", [task("bad", "fail")])
    log = str(tmp_path / "log")
    result = _executor("run", str(source), "--log", log, "--json", "--no-prefetch")
    assert result.returncode == 1
    assert json.loads(result.stdout)["tasks"]["bad"]["error"]["type"] == "ValueError"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["validate", "/nonexistent"], "Error: /nonexistent: no such file or directory"),
        (["run", "/nonexistent", "--log", "/tmp/x"], "Error: /nonexistent: no such file"),
        (["run", ".", "--workers", "0"], "Error: --workers: '0' is not an integer >= 1"),
        (["run", ".", "--node-id", "a b"], "Error: --node-id: 'a b' is not 1-128"),
        (["pack", "/nonexistent", "-o", "/tmp/x.tar.gz"], "Error: /nonexistent: not a directory"),
        (["frobnicate"], "Error: argument COMMAND: invalid choice: 'frobnicate'"),
        (["pack", "."], "Error: the following arguments are required: -o/--output"),
        ([], "Error: the following arguments are required: COMMAND"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], expected: str) -> None:
    assert _one_line_error(_executor(*args)).startswith(expected)


def test_invalid_pipeline_is_one_line_for_run_and_validate(tmp_path: Path) -> None:
    source = make_pipeline(tmp_path / "p", [task("a", "add", ["a"])])
    for args in (["validate"], ["run", "--log", str(tmp_path / "l")]):
        line = _one_line_error(_executor(*args, str(source)))
        assert line == f"Error: {source / 'pipeline.json'}: dependency cycle: a -> a"
    (source / "pipeline.json").write_text("")
    assert _one_line_error(_executor("validate", str(source))).endswith("pipeline.json is empty")


def test_bad_environment_is_one_line(tmp_path: Path) -> None:
    source = make_pipeline(tmp_path / "p", [task("a", "add")])
    env = dict(os.environ, EXECUTOR_WORKERS="lots")
    line = _one_line_error(_executor("run", str(source), "--log", str(tmp_path / "l"), env=env))
    assert line == "Error: EXECUTOR_WORKERS: 'lots' is not an integer >= 1"


def test_sigterm_from_outside_cancels_and_writes_results(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild.pid"
    source = make_pipeline(
        tmp_path / "p",
        [
            task("slow", "sleep_with_grandchild", args={"pidfile": str(pidfile)}),
            task("next", "add", ["slow"]),
        ],
    )
    results_path = tmp_path / "results.json"
    argv = [*EXECUTOR, "run", str(source), "--log", str(tmp_path / "log")]
    code, stderr = signal_when([*argv, "--results", str(results_path)], signal.SIGTERM, pidfile)
    assert code == 1, stderr
    results = json.loads(results_path.read_text())
    assert results["status"] == "cancelled"
    assert {t: e["status"] for t, e in results["tasks"].items()} == {
        "slow": "cancelled",
        "next": "cancelled",
    }
    assert not process_alive(int(pidfile.read_text()))
    assert "received SIGTERM" in (tmp_path / "log").read_text()


def test_a_big_pool_raises_a_low_open_files_limit(tmp_path: Path) -> None:
    # 16 workers hold over 400 pipe ends in the manager: more than a soft limit of 256.
    source = make_pipeline(tmp_path / "p", [task(f"t{i}", "fields") for i in range(16)])
    env = dict(os.environ, EXECUTOR_STATE_DIR=str(tmp_path / "state"), EXECUTOR_RUN_ID="r1")
    script = (
        "import resource, sys\n"
        "limit = resource.RLIMIT_NOFILE\n"
        "resource.setrlimit(limit, (256, resource.getrlimit(limit)[1]))\n"
        "from executor.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "run", str(source), "--workers", "16", "--json"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert {entry["status"] for entry in results["tasks"].values()} == {"succeeded"}


def test_missing_requirements_are_named_one_line_each_and_nothing_runs(tmp_path: Path) -> None:
    source = make_pipeline(tmp_path / "p", [task("a", "add")])
    (source / "requirements.txt").write_text("surely-not-installed-a>=1\nclick\nsurely-not-b\n")
    state = tmp_path / "state"
    env = dict(os.environ, EXECUTOR_STATE_DIR=str(state), EXECUTOR_RUN_ID="r1")
    for command in ("run", "validate"):
        result = _executor(command, str(source), env=env)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        where = source / "requirements.txt"
        assert result.stderr.splitlines() == [
            f"Error: {where}: surely-not-installed-a>=1: not installed",
            f"Error: {where}: surely-not-b: not installed",
            f"(install them into {sys.executable}; executor installs nothing)",
        ]
    assert not (state / "logs").exists()  # no run started, no log written
    packed = _executor("pack", str(source), "-o", str(tmp_path / "p.tar.gz"))
    assert packed.returncode == 0, packed.stderr  # packing needs no installed requirements


@pytest.mark.parametrize("command", [["validate", "--json"], ["run", "--json"]])
def test_a_reader_that_stops_early_gets_no_error(tmp_path: Path, command: list[str]) -> None:
    """`executor ... | head`: the reader closed the pipe before the output was written."""
    source = make_pipeline(tmp_path / "p", [task("a", "add")])
    read_end, write_end = os.pipe()
    os.close(read_end)
    args = [*EXECUTOR, command[0], str(source), *command[1:]]
    if command[0] == "run":
        args += ["--log", str(tmp_path / "log")]
    try:
        done = subprocess.run(
            args, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (1, "")
