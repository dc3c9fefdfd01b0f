"""`executor agent` entry: status lines and configuration errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from executor.agent.config import AgentConfig, load_config
from executor.agent.main import main
from executor.cli import main as executor_main


def test_configuration_error_exits_2_with_status_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("EXECUTOR_PIPELINE", "EXECUTOR_MASTER_URL", "EXECUTOR_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EXECUTOR_NODE_ID", "node-a")
    monkeypatch.setenv("EXECUTOR_STATE_DIR", str(tmp_path))
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "EXECUTOR-STATUS node=node-a run=- state=starting",
        "EXECUTOR-STATUS node=node-a run=- state=invalid",
    ]
    assert (
        err.strip()
        == "executor agent: error: EXECUTOR_PIPELINE is required (a path or gateway:NAME)"
    )


def test_options_override_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EXECUTOR_NODE_ID", "from-env")
    monkeypatch.setenv("EXECUTOR_STATE_DIR", str(tmp_path))
    args = ["--node-id", "bad id!", "--run-id", "r1", "--pipeline", str(tmp_path)]
    assert executor_main(["agent", *args]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "EXECUTOR-STATUS node=bad?id? run=r1 state=invalid"
    assert "EXECUTOR_NODE_ID: 'bad id!'" in err


def test_help_through_the_executor_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        executor_main(["agent", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "EXECUTOR_POWEROFF_COMMAND" in out and "EXECUTOR-STATUS node=<id>" in out


def standalone(tmp_path: Path) -> AgentConfig:
    """A node without a master, its pipeline path an empty directory."""
    return load_config(
        {
            "EXECUTOR_NODE_ID": "node-a",
            "EXECUTOR_RUN_ID": "r1",
            "EXECUTOR_PIPELINE": str(tmp_path),
            "EXECUTOR_STATE_DIR": str(tmp_path / "state"),
        }
    )


def test_an_agent_error_during_the_run_still_produces_a_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from executor.agent import main as agent_main
    from executor.agent import runner

    def broken(*_args: object) -> dict[str, object]:
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(runner, "run_pipeline", broken)
    config = standalone(tmp_path)
    assert agent_main.Agent(config).run() == (1, "failed")
    results = (config.run_dir / "results.json").read_text()
    assert '"tasks": {}' in results and '"status": "failed"' in results
    log = (config.run_dir / "combined.log").read_text()
    assert "RuntimeError: engine exploded" in log
    # A second start finds the outcome and does not run again.
    monkeypatch.setattr(runner, "run_pipeline", None)
    assert agent_main.Agent(config).run() == (1, "failed")


def test_a_combined_log_that_cannot_be_opened_still_ends_with_a_report(
    tmp_path: Path,
) -> None:
    """A read-only or full state disk can refuse the log file itself (here: a directory
    in its place): the run still ends with its results and outcome, not a crash."""
    from executor.agent import main as agent_main

    config = standalone(tmp_path)
    (config.run_dir / "combined.log").mkdir(parents=True)
    assert agent_main.Agent(config).run() == (4, "failed")  # 4: the state disk failed it
    assert '"status": "failed"' in (config.run_dir / "results.json").read_text()
    assert '"state": "failed"' in (config.run_dir / "outcome.json").read_text()


def test_a_standalone_outcome_keeps_the_runs_own_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a master nothing is sent, so no result is left out for size: the outcome
    says what results.json says, even for results over the server's body limit."""
    from executor.agent import main as agent_main
    from executor.agent import reportlog
    from tests.integration.executor_pipelines import make_pipeline, task

    def small_limit(
        results: dict[str, Any], log_text: str, recut: Callable[[int], str]
    ) -> dict[str, Any]:
        return reportlog.fit_report(results, log_text, recut, limit=64 * 1024)

    monkeypatch.setattr(agent_main, "fit_report", small_limit)
    pipeline = make_pipeline(tmp_path / "p", [task("big", "echo", args={"value": "x" * 200_000})])
    config = standalone(tmp_path)
    config = dataclasses.replace(config, pipeline=str(pipeline))
    assert agent_main.Agent(config).run() == (0, "succeeded")
    outcome = json.loads((config.run_dir / "outcome.json").read_text())
    assert outcome == {"exit": 0, "state": "succeeded", "status": "succeeded"}


def test_an_image_that_cannot_import_the_engine_still_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is imported after the heartbeats start; failing there is a failed run
    with a report, not a crash without one."""
    from executor.agent import main as agent_main

    monkeypatch.setitem(sys.modules, "executor.agent.runner", None)  # import fails
    config = standalone(tmp_path)
    assert agent_main.Agent(config).run() == (1, "failed")
    assert '"status": "failed"' in (config.run_dir / "results.json").read_text()
    assert "import of executor.agent.runner halted" in (config.run_dir / "combined.log").read_text()


def test_the_token_hand_over_survives_a_failed_reexec(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from executor.agent import secret

    def refuse(*_args: object) -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(os, "memfd_create", refuse)
    environ = {"EXECUTOR_TOKEN": "tok"}
    secret.reexec_without_token(environ)  # returns instead of crashing the agent
    assert environ == {"EXECUTOR_TOKEN": "tok"}
    assert "EXECUTOR_TOKEN stays in the environment" in capsys.readouterr().err


def test_take_token_reads_once_and_closes() -> None:
    from executor.agent import secret

    fd = os.memfd_create("t", 0)
    os.write(fd, b"tok\n")
    environ = {"EXECUTOR_TOKEN_FD": str(fd)}
    assert secret.take_token(environ) == "tok"
    assert environ == {} and secret.take_token(environ) is None
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_the_agent_executes_itself_again_before_it_imports_anything_heavy() -> None:
    """What is imported before the re-execution is imported twice at every boot: by then
    only the command line and the token hand-over may be loaded."""
    probe = (
        "import sys\n"
        "import executor.agent.secret as secret\n"
        "def stop(*_args):\n"
        "    heavy = ('executor.agent.main', 'executor.pipeline', 'executor.engine',\n"
        "             'executor.services', 'tenacity', 'packaging', 'ctypes', 'ssl')\n"
        "    print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "    raise SystemExit(0)\n"
        "secret.reexec_without_token = stop\n"
        "from executor.cli import main\n"
        "main(['agent'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_a_token_with_a_newline_is_a_configuration_error_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p").mkdir()
    monkeypatch.delenv("EXECUTOR_TOKEN_FILE", raising=False)
    for name, value in {
        "EXECUTOR_NODE_ID": "node-a",
        "EXECUTOR_RUN_ID": "r1",
        "EXECUTOR_STATE_DIR": str(tmp_path / "state"),
        "EXECUTOR_PIPELINE": str(tmp_path / "p"),
        "EXECUTOR_MASTER_URL": "http://127.0.0.1:9",
        "EXECUTOR_TOKEN": "abc\ndef",
    }.items():
        monkeypatch.setenv(name, value)
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "EXECUTOR-STATUS node=node-a run=r1 state=starting",
        "EXECUTOR-STATUS node=node-a run=r1 state=invalid",
    ]
    assert err.startswith("executor agent: error: EXECUTOR_TOKEN: ") and err.count("\n") == 1
