"""`executor agent` entry: status lines and configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest

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
