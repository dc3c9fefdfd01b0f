"""`executor agent` against a real `imagefactory serve` on loopback: delivery when the
master is down, crashes of the server and of the agent, refusals, the gateway, poweroff."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from executor.pack import pack
from tests.integration.services_harness import (
    AgentProcess,
    ServerProcess,
    free_port,
    write_pipeline,
)

pytestmark = pytest.mark.timeout(900)

AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "server")
    proc.workdir.mkdir()
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture
def stopped_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server that is not running yet, on a port nothing listens on."""
    proc = ServerProcess(tmp_path / "server", port=free_port())
    proc.workdir.mkdir()
    # Created now so that node tokens can be derived before the server first starts.
    proc.secret_file.write_text("test-fleet-secret\n")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentFactory]:
    started: list[AgentProcess] = []

    def make(server: ServerProcess, pipeline: Path | str, **env: str) -> AgentProcess:
        node = env.pop("node", "node-a")
        workdir = tmp_path / f"agent-{len(started)}"
        workdir.mkdir()
        variables = {
            "EXECUTOR_NODE_ID": node,
            "EXECUTOR_MASTER_URL": f"http://127.0.0.1:{server.port}",
            "EXECUTOR_TOKEN": server.node_token(node),
            "EXECUTOR_PIPELINE": str(pipeline),
            "EXECUTOR_HEARTBEAT_S": "0.5",
            "EXECUTOR_WORKERS": "2",
            **env,
        }
        proc = AgentProcess(workdir, variables)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.kill()


def reports(server: ServerProcess) -> list[dict[str, Any]]:
    """Every stored report, from the database file itself."""
    rows = server.rows("reports")
    return [{**json.loads(row[7]), "log": row[8]} for row in rows]


def statuses(proc: AgentProcess) -> list[str]:
    return [line for line in proc.console() if line.startswith("EXECUTOR-STATUS ")]


def test_run_heartbeats_and_report(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    proc = agent(server, write_pipeline(tmp_path / "p"), EXECUTOR_RUN_ID="run-ok").start()
    assert proc.wait() == 0, proc.tail()
    assert statuses(proc) == [
        "EXECUTOR-STATUS node=node-a run=run-ok state=starting",
        "EXECUTOR-STATUS node=node-a run=run-ok state=succeeded",
    ]
    [stored] = reports(server)
    assert stored["run_id"] == "run-ok" and stored["status"] == "succeeded"
    first = stored["tasks"]["second"]["result"]["upstream"]["first"]
    assert (first["task"], first["value"], first["upstream"]) == ("first", 1, {})
    # Tasks see the agent's environment, except the node's token.
    assert first["env"] == {"EXECUTOR_NODE_ID": "node-a", "EXECUTOR_TOKEN": None}
    assert "task:first out first naps 0.1 s" in stored["log"]
    [node] = server.rows("nodes")
    assert node[:4] == ("node-a", "run-ok", node[2], "done")
    assert node[4:6] == (2, 2), "tasks_done and tasks_total"
    assert not list((proc.state_dir / "spool").iterdir())
    receipt = json.loads((proc.state_dir / "delivered" / "run-ok.json").read_text())
    assert receipt["http_status"] == 201


def test_master_down_at_start_then_up_20s_later(
    stopped_server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    proc = agent(stopped_server, write_pipeline(tmp_path / "p")).start()
    spooled = proc.wait_for("spool/*.json")  # the run finished while the master was down
    run_id = spooled.stem
    time.sleep(20)
    assert proc.proc is not None and proc.proc.poll() is None, "agent waits for the master"
    stopped_server.start()
    assert proc.wait() == 0, proc.tail()
    [stored] = reports(stopped_server)
    assert stored["run_id"] == run_id and stored["status"] == "succeeded"
    assert not spooled.exists(), "deleted once acknowledged"
    # Heartbeats resumed: the node is known with its final state.
    [node] = stopped_server.rows("nodes")
    assert (node[0], node[1], node[3]) == ("node-a", run_id, "done")
    receipt = json.loads((proc.state_dir / "delivered" / f"{run_id}.json").read_text())
    assert receipt["http_status"] == 201


def test_server_killed_mid_run_and_restarted(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    pipeline = write_pipeline(tmp_path / "p", first_task_seconds=8)
    proc = agent(server, pipeline, EXECUTOR_RUN_ID="run-crash").start()
    deadline = time.monotonic() + 120
    while not server.rows("nodes") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.rows("nodes"), "a heartbeat arrived before the crash"
    server.kill()
    time.sleep(3)
    server.start()  # same port, same database file
    assert proc.wait() == 0, proc.tail()
    [stored] = reports(server)
    local = json.loads((proc.state_dir / "runs" / "run-crash" / "results.json").read_text())
    assert {k: v for k, v in stored.items() if k != "log"} == local
    [node] = server.rows("nodes")
    assert (node[1], node[3]) == ("run-crash", "done")


def test_agent_killed_after_spooling_resends_without_rerunning(
    stopped_server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    first = agent(stopped_server, write_pipeline(tmp_path / "p")).start()
    spooled = first.wait_for("spool/*.json")
    sent = spooled.read_bytes()
    first.kill()
    stopped_server.start()
    # Same state directory, no EXECUTOR_RUN_ID: the persisted run id is used again.
    again = AgentProcess(first.workdir, first.env).start()
    assert again.wait() == 0, again.tail()
    [stored] = reports(stopped_server)
    assert stored == json.loads(sent)
    assert stored["log"].count(" started: pipeline slow-demo") == 1, "not run a second time"
    lines = statuses(again)
    assert lines[-1].endswith(f"run={spooled.stem} state=succeeded")


def test_sha256_mismatch_is_reported_and_not_run(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    archive = tmp_path / "p.tar.gz"
    pack(write_pipeline(tmp_path / "p"), archive)
    proc = agent(server, archive, EXECUTOR_PIPELINE_SHA256="0" * 64, EXECUTOR_RUN_ID="r-sha")
    assert proc.start().wait() == 2, proc.tail()
    [stored] = reports(server)
    assert (stored["status"], stored["tasks"]) == ("failed", {})
    assert "sha256 is" in stored["log"] and "0" * 64 in stored["log"]
    assert statuses(proc)[-1].endswith("state=invalid")


def test_gateway_pipeline_with_checked_sha256(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    archive = tmp_path / "p.tar.gz"
    sha = pack(write_pipeline(tmp_path / "p"), archive)
    r = httpx.put(
        f"{server.url}/v1/pipelines/slow",
        content=archive.read_bytes(),
        headers={"Authorization": f"Bearer {server.admin_token}"},
    )
    assert r.status_code == 200 and r.json()["sha256"] == sha
    proc = agent(server, "gateway:slow", EXECUTOR_PIPELINE_SHA256=sha, EXECUTOR_RUN_ID="r-gw")
    assert proc.start().wait() == 0, proc.tail()
    assert reports(server)[0]["pipeline"] == "slow-demo"


def test_unknown_gateway_pipeline_is_a_configuration_error(
    server: ServerProcess, agent: AgentFactory
) -> None:
    proc = agent(server, "gateway:missing", EXECUTOR_RUN_ID="r-missing").start()
    assert proc.wait() == 2, proc.tail()
    [stored] = reports(server)
    assert "404 no pipeline named missing" in stored["log"]


def test_refused_report_stays_on_disk(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    proc = agent(server, write_pipeline(tmp_path / "p"), EXECUTOR_TOKEN="f" * 64)
    assert proc.start().wait() == 3, proc.tail()
    [kept] = (proc.state_dir / "spool").glob("*.json")
    assert json.loads(kept.read_text())["status"] == "succeeded"
    assert reports(server) == [] and server.rows("nodes") == []
    assert statuses(proc)[-1].endswith("state=refused-401")
    assert "refused by the master" in (proc.workdir / "agent.err").read_text()


def poweroff_after(grace_s: float, marker: Path) -> dict[str, str]:
    """The agent's poweroff settings, its "power off" a harmless `touch marker`."""
    return {
        "EXECUTOR_ON_COMPLETE": "poweroff",
        "EXECUTOR_POWEROFF_GRACE_S": f"{grace_s:g}",
        "EXECUTOR_POWEROFF_COMMAND": f"touch {marker}",
    }


def test_poweroff_after_the_grace_period_when_undeliverable(
    stopped_server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "powered-off"
    proc = agent(stopped_server, write_pipeline(tmp_path / "p"), **poweroff_after(3, marker))
    assert proc.start().wait() == 3, proc.tail()
    assert marker.exists()
    assert statuses(proc)[-1].endswith("state=undelivered")
    assert len(list((proc.state_dir / "spool").glob("*.json"))) == 1


def test_poweroff_after_the_grace_period_when_the_gateway_is_unreachable(
    stopped_server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "powered-off"
    env = poweroff_after(3, marker)
    first = agent(stopped_server, "gateway:slow", EXECUTOR_RUN_ID="r-gw-down", **env)
    assert first.start().wait(timeout_s=120) == 3, first.tail()
    assert marker.exists(), "an ephemeral node must not stay up waiting for its pipeline"
    assert statuses(first)[-1].endswith("run=r-gw-down state=undelivered")
    [kept] = (first.state_dir / "spool").glob("*.json")
    spooled = json.loads(kept.read_text())
    assert (spooled["status"], spooled["tasks"]) == ("failed", {})
    assert "pipeline slow not downloaded within EXECUTOR_POWEROFF_GRACE_S (3 s)" in spooled["log"]
    # The next boot delivers it once the master is back, and does not run it again.
    stopped_server.start()
    again = agent(stopped_server, "gateway:slow", EXECUTOR_RUN_ID="r-gw-down")
    again.env["EXECUTOR_STATE_DIR"] = str(first.state_dir)
    assert again.start().wait() == 1, again.tail()
    [stored] = reports(stopped_server)
    assert (stored["run_id"], stored["status"]) == ("r-gw-down", "failed")


def test_without_poweroff_the_gateway_download_waits_for_the_master(
    stopped_server: ServerProcess, agent: AgentFactory
) -> None:
    proc = agent(stopped_server, "gateway:slow", EXECUTOR_POWEROFF_GRACE_S="1").start()
    errors = proc.workdir / "agent.err"
    deadline = time.monotonic() + 60
    while "retrying until the master answers" not in errors.read_text():
        assert time.monotonic() < deadline, proc.tail()
        time.sleep(0.2)
    time.sleep(2)  # past EXECUTOR_POWEROFF_GRACE_S, which applies only with poweroff
    assert proc.proc is not None and proc.proc.poll() is None, proc.tail()
    proc.kill()


def test_poweroff_once_acknowledged(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    marker = tmp_path / "powered-off"
    proc = agent(
        server,
        write_pipeline(tmp_path / "p"),
        EXECUTOR_ON_COMPLETE="poweroff",
        EXECUTOR_POWEROFF_COMMAND=f"touch {marker}",
    )
    assert proc.start().wait() == 0, proc.tail()
    assert marker.exists() and len(reports(server)) == 1


def test_standalone_without_a_master(agent: AgentFactory, tmp_path: Path) -> None:
    unused = ServerProcess(tmp_path / "unused")
    unused.workdir.mkdir()
    unused.secret_file.write_text("s\n")
    proc = agent(unused, write_pipeline(tmp_path / "p"), EXECUTOR_RUN_ID="solo")
    del proc.env["EXECUTOR_MASTER_URL"], proc.env["EXECUTOR_TOKEN"]
    assert proc.start().wait() == 0, proc.tail()
    results = json.loads((proc.state_dir / "runs" / "solo" / "results.json").read_text())
    assert results["status"] == "succeeded"
    assert not (proc.state_dir / "spool").exists() or not any((proc.state_dir / "spool").iterdir())


def test_a_master_that_never_answers_does_not_hold_up_the_run(
    agent: AgentFactory, tmp_path: Path
) -> None:
    """Heartbeats hang on a master that accepts connections and never answers; the run
    still finishes and its report is spooled, waiting for delivery."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        mute = ServerProcess(tmp_path / "mute", port=silent.getsockname()[1])
        mute.workdir.mkdir()
        mute.secret_file.write_text("s\n")
        proc = agent(mute, write_pipeline(tmp_path / "p"), EXECUTOR_RUN_ID="r-mute").start()
        proc.wait_for("runs/r-mute/results.json")
        spooled = proc.wait_for("spool/r-mute.json")
        assert json.loads(spooled.read_text())["status"] == "succeeded"
        assert proc.proc is not None and proc.proc.poll() is None, "still trying to deliver"
        proc.kill()


def test_invalid_pipeline_is_reported(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    broken = write_pipeline(tmp_path / "p")
    (broken / "pipeline.json").write_text('{"format": 1, "name": "x", "tasks": [{"id": "a"}]}')
    proc = agent(server, broken, EXECUTOR_RUN_ID="r-broken")
    assert proc.start().wait() == 2, proc.tail()
    [stored] = reports(server)
    assert (stored["status"], stored["tasks"]) == ("failed", {})
    assert "pipeline not run: " in stored["log"] and "pipeline.json" in stored["log"]


def test_sigterm_cancels_the_run_and_the_report_says_so(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    pipeline = write_pipeline(tmp_path / "p", first_task_seconds=120)
    proc = agent(server, pipeline, EXECUTOR_RUN_ID="r-term").start()
    proc.wait_for("runs/r-term/combined.log")
    deadline = time.monotonic() + 120
    log = proc.state_dir / "runs" / "r-term" / "combined.log"
    while "first naps" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.proc is not None
    proc.proc.send_signal(signal.SIGTERM)  # the agent only, as systemd's stop would first
    assert proc.wait() == 1, proc.tail()
    [stored] = reports(server)
    assert stored["status"] == "cancelled"
    assert stored["tasks"]["first"]["status"] == "cancelled"
    assert statuses(proc)[-1].endswith("run=r-term state=cancelled")


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of 16 KiB, filled up; needs root (mount)."""
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        with contextlib.suppress(OSError), (mountpoint / "filler").open("wb") as filler:
            while True:
                filler.write(bytes(4096))
                filler.flush()
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_state_disk_still_reports_from_memory(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path, full_disk: Path
) -> None:
    proc = agent(server, write_pipeline(tmp_path / "p"), EXECUTOR_STATE_DIR=str(full_disk))
    assert proc.start().wait() == 4, proc.tail()  # the documented "state lost" code
    [stored] = reports(server)
    assert stored["status"] == "succeeded", "the run went on without its log"
    assert set(stored["tasks"]) == {"first", "second"}
    truncated = "[the combined log is truncated: cannot write the combined log: No space"
    assert truncated in stored["log"]
    assert not list(full_disk.glob("spool/*.json")), "delivered from memory, not from the spool"
    [node] = server.rows("nodes")
    assert (node[1], node[3]) == (stored["run_id"], "failed"), "a final heartbeat arrived"
    assert "Traceback" not in "\n".join(proc.console())


BIG_TASKS = """
import sys


def escapes(ctx):
    line = "\\x1b" * 1023 + "\\n"  # 1 byte in the log, 6 in JSON (\\u001b)
    for _ in range(17 * 1024):
        sys.stdout.write(line)
    return "printed"


def huge(ctx):
    return "r" * (40 * 1024 * 1024)
"""


def big_pipeline(directory: Path, call: str) -> Path:
    directory.mkdir()
    document = {"format": 1, "name": "big", "tasks": [{"id": "big", "call": f"bigtasks:{call}"}]}
    (directory / "pipeline.json").write_text(json.dumps(document))
    (directory / "bigtasks.py").write_text(BIG_TASKS)
    return directory


def test_a_log_that_grows_in_json_still_fits_the_servers_body_limit(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    proc = agent(server, big_pipeline(tmp_path / "p", "escapes"), EXECUTOR_RUN_ID="r-esc")
    assert proc.start().wait() == 0, proc.tail()
    [stored] = reports(server)
    assert stored["tasks"]["big"]["result"] == "printed"
    assert len(json.dumps(stored, ensure_ascii=False).encode()) <= 32 * 1024 * 1024
    assert "bytes of the combined log left out of this report" in stored["log"]
    assert "task big attempt 1 succeeded" in stored["log"][-4096:], "the end is kept"


def test_results_over_the_servers_body_limit_are_replaced_by_a_note(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    proc = agent(server, big_pipeline(tmp_path / "p", "huge"), EXECUTOR_RUN_ID="r-huge")
    assert proc.start().wait() == 1, proc.tail()
    assert statuses(proc)[-1].endswith("run=r-huge state=failed")
    [stored] = reports(server)
    assert stored["status"] == "failed", "the master cannot see the results: not a success"
    assert stored["tasks"]["big"]["status"] == "succeeded"
    assert stored["tasks"]["big"]["result"] is None
    assert "results left out of this report" in stored["log"]
    kept = json.loads((proc.state_dir / "runs" / "r-huge" / "results.json").read_text())
    assert len(kept["tasks"]["big"]["result"]) == 40 * 1024 * 1024, "the node keeps them"


SNOOP_TASK = '''
import gc, os, re

HEX64 = re.compile(r"[0-9a-f]{64}")


def environs():
    """The environment of this process and of every ancestor it can read."""
    seen, pid = {}, os.getpid()
    while pid > 1:
        try:
            seen[pid] = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
            stat = open(f"/proc/{pid}/stat").read()
        except OSError as exc:
            seen[pid] = f"unreadable: {exc.strerror}"
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return seen


def snoop(ctx):
    strings = {o for o in gc.get_objects() if isinstance(o, str) and HEX64.fullmatch(o)}
    for o in gc.get_objects():  # strings inside containers are not tracked themselves
        values = o.values() if isinstance(o, dict) else vars(o).values() if hasattr(
            o, "__dict__") else o if isinstance(o, (list, tuple)) else ()
        strings |= {v for v in values if isinstance(v, str) and HEX64.fullmatch(v)}
    return {"env_token": os.environ.get("EXECUTOR_TOKEN"), "environs": environs(),
            "hex64": sorted(strings)}
'''


def test_tasks_cannot_find_the_node_token(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    source = tmp_path / "snoop"
    source.mkdir()
    (source / "pipeline.json").write_text(
        json.dumps({"format": 1, "name": "snoop", "tasks": [{"id": "s", "call": "snoop:snoop"}]})
    )
    (source / "snoop.py").write_text(SNOOP_TASK)
    proc = agent(server, source, EXECUTOR_RUN_ID="run-snoop").start()
    assert proc.wait() == 0, proc.tail()
    token = server.node_token("node-a")
    [stored] = reports(server)
    seen = stored["tasks"]["s"]["result"]
    assert seen["env_token"] is None
    assert len(seen["environs"]) >= 3, "the worker, the forkserver, the agent and up"
    assert not [pid for pid, env in seen["environs"].items() if token in env]
    assert token not in seen["hex64"]
    agent_environ = Path(f"/proc/{proc.proc.pid}/environ") if proc.proc else None
    assert agent_environ is None or not agent_environ.exists(), "the agent has exited"


def test_the_token_can_come_from_a_file(
    server: ServerProcess, agent: AgentFactory, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(server.node_token("node-a") + "\n")
    proc = agent(
        server,
        write_pipeline(tmp_path / "p"),
        EXECUTOR_TOKEN="",
        EXECUTOR_TOKEN_FILE=str(token_file),
        EXECUTOR_RUN_ID="run-file",
    )
    assert proc.start().wait() == 0, proc.tail()
    assert [r["run_id"] for r in reports(server)] == ["run-file"]
