"""A master started with a lower `--max-body-bytes` than the agent's own report limit, for
real: the server judges the report by its headers and discards it unparsed, and the agent
must see the 413 (exit 3, the report kept in its spool) rather than a reset connection
to retry for ever."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.services_harness import BIN, ServerProcess

CHATTY = """
def chatty(ctx):
    for n in range(40000):  # about 4 MiB of combined log, 64 times the master's limit
        print("line", n, "x" * 80)
    return "done"
"""


def test_a_report_over_the_masters_body_limit_is_refused_not_retried(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    server = ServerProcess(tmp_path / "server", extra_args=("--max-body-bytes", "65536"))
    server.workdir.mkdir()
    request.addfinalizer(server.stop)
    server.start()
    pipeline = tmp_path / "p"
    pipeline.mkdir()
    (pipeline / "chatty.py").write_text(CHATTY)
    (pipeline / "pipeline.json").write_text(
        json.dumps({"format": 1, "name": "chatty", "tasks": [{"id": "c", "call": "chatty:chatty"}]})
    )
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
    env.update(
        EXECUTOR_NODE_ID="node-a",
        EXECUTOR_RUN_ID="run-big",
        EXECUTOR_MASTER_URL=server.url,
        EXECUTOR_TOKEN=server.node_token("node-a"),
        EXECUTOR_PIPELINE=str(pipeline),
        EXECUTOR_STATE_DIR=str(state),
        EXECUTOR_HEARTBEAT_S="0.5",
        EXECUTOR_WORKERS="1",
    )
    result = subprocess.run(
        [str(BIN / "executor"), "agent"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == (
        "EXECUTOR-STATUS node=node-a run=run-big state=refused-413"
    )
    assert "exceeds 65536 bytes" in result.stderr and "Traceback" not in result.stderr
    spooled = json.loads((state / "spool" / "run-big.json").read_text())
    assert spooled["tasks"]["c"]["result"] == "done" and "line 39999" in spooled["log"]
    assert server.rows("reports") == []
