"""EXECUTOR_FASTPATHS as a user sets it: a run goes through with the fast paths off,
and a value other than on/off stops the run at its start with one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor import settings
from executor.services.server import RunServices
from executor.services.wire import ServiceError
from tests.integration.executor_pipelines import make_pipeline, task

EXECUTOR = [sys.executable, "-m", "executor"]


def executor_run(source: Path, tmp_path: Path, switch: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, EXECUTOR_FASTPATHS=switch, EXECUTOR_STATE_DIR=str(tmp_path / "s"))
    argv = [*EXECUTOR, "run", str(source), "--workers", "3", "--json"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)


@pytest.mark.parametrize("switch", ["on", "off"])
def test_a_run_shares_its_store_and_events_either_way(tmp_path: Path, switch: str) -> None:
    tasks = [
        task("i1", "store_incr", args={"key": "k", "times": 200}),
        task("i2", "store_incr", args={"key": "k", "times": 200}),
        task("read", "store_read", ["i1", "i2"], args={"key": "k"}),
        task("pub", "publish_event", args={"topic": "t", "payload": {"n": 1}}),
        task("wait", "wait_event", ["pub"], args={"topic": "t", "timeout": 60}),
    ]
    result = executor_run(make_pipeline(tmp_path / "p", tasks), tmp_path, switch)
    assert result.returncode == 0, result.stderr
    outcome = {t: entry["result"] for t, entry in json.loads(result.stdout)["tasks"].items()}
    assert outcome["read"] == 400 and outcome["wait"] == {"n": 1}


def test_an_invalid_switch_stops_the_run_with_one_error_line(tmp_path: Path) -> None:
    result = executor_run(make_pipeline(tmp_path / "p", [task("a", "add")]), tmp_path, "fast")
    assert result.returncode == 2  # a usage error, checked with the other settings
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert lines[0].endswith("EXECUTOR_FASTPATHS: 'fast' is neither 'on' nor 'off'")


def test_run_services_refuse_to_start_with_an_invalid_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EXECUTOR_FASTPATHS", "Off")
    settings.fastpaths_on.cache_clear()
    try:
        svc = RunServices("invalid-switch")
        with pytest.raises(ServiceError, match=r"^EXECUTOR_FASTPATHS: 'Off' is neither"):
            svc.start()
        assert svc.pid is None
    finally:
        settings.fastpaths_on.cache_clear()
