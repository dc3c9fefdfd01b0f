"""Following the serial console for EXECUTOR-STATUS lines, and showing its tail."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click
import httpx
import pytest

from imagefactory.boot import console, nodestate, waiting


def test_status_is_found_inside_noisy_lines() -> None:
    line = "[  12.3] executor[401]: EXECUTOR-STATUS node=n-1 run=r-9 state=starting\r"
    assert console.parse_status(line) == console.Status("n-1", "r-9", "starting")
    assert console.parse_status("EXECUTOR-STATUS node=n-1 run=r") is None
    assert console.parse_status("ordinary boot message") is None


def test_final_states() -> None:
    assert not console.Status("n", "r", "starting").final
    assert not console.Status("n", "r", "running").final
    assert console.Status("n", "r", "succeeded").final
    assert console.Status("n", "r", "failed").final


def test_follower_reads_only_what_was_appended(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    follower = console.ConsoleFollower(log)
    assert follower.poll() == [] and follower.last is None  # not created yet
    with log.open("ab") as f:
        f.write(b"boot...\nEXECUTOR-STATUS node=a run=r state=star")
    assert follower.poll() == []  # the line is not complete yet
    with log.open("ab") as f:
        f.write(b"ting\n\xff\xfe garbage\nEXECUTOR-STATUS node=a run=r state=succeeded\n")
    assert [s.state for s in follower.poll()] == ["starting", "succeeded"]
    assert follower.poll() == []
    assert follower.last == console.Status("a", "r", "succeeded")
    assert len(follower.statuses) == 2


def test_tail_strips_escape_sequences_and_line_ends(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(
        b"".join(b"line %d\r\n" % i for i in range(30)) + b"\x1b[0;32m  OK  \x1b[0m\r\n"
    )
    lines = console.tail(log, 3)
    assert lines == ["line 28", "line 29", "  OK  "]
    assert console.tail(tmp_path / "missing.log") == []


class FakeMachine:
    def __init__(self, running: bool = True) -> None:
        self.is_running = running

    def running(self) -> bool:
        return self.is_running

    def stop(self) -> None:
        self.is_running = False


def booted(
    tmp_path: Path, console_text: str = "", running: bool = True, node_id: str = "n-1"
) -> waiting.BootedNode:
    log = tmp_path / f"{node_id}.console.log"
    log.write_text(console_text)
    record = nodestate.NodeRecord(
        node_id=node_id,
        run_id="r-1",
        instance_id="i",
        backend="qemu",
        ssh_port=1,
        ssh_user="ops",
        ssh_key="k",
        workdir=str(tmp_path),
        console_log=str(log),
    )
    return waiting.BootedNode(
        record, FakeMachine(running), console.ConsoleFollower(log), time.monotonic()
    )


STARTING = "EXECUTOR-STATUS node=n-1 run=r-1 state=starting\n"
DONE = "EXECUTOR-STATUS node=n-1 run=r-1 state=succeeded\n"


@pytest.mark.parametrize(
    ("wait", "text", "running", "outcome"),
    [
        ("none", "", True, "started"),
        ("heartbeat", "", True, None),
        ("heartbeat", STARTING, True, "agent started"),
        ("report", STARTING, True, None),
        ("report", STARTING + DONE, True, "report (succeeded)"),
        ("poweroff", STARTING + DONE, True, None),
        ("poweroff", STARTING + DONE, False, "powered off"),
    ],
)
def test_conditions_read_from_the_console(
    tmp_path: Path, wait: str, text: str, running: bool, outcome: str | None
) -> None:
    assert waiting.met(wait, booted(tmp_path, text, running), None) == outcome


def api(handler: Callable[[httpx.Request], httpx.Response]) -> waiting.MasterApi:
    master = waiting.MasterApi("http://127.0.0.1:1", "admin")
    master.client = httpx.Client(
        base_url="http://127.0.0.1:1",
        headers=master.client.headers,
        transport=httpx.MockTransport(handler),
    )
    return master


def test_conditions_asked_from_the_master(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer admin"
        if request.url.path == "/v1/nodes":
            return httpx.Response(200, json=[{"node_id": "n-1", "run_id": "r-1", "alive": True}])
        if request.url.path == "/v1/runs/r-1":
            return httpx.Response(200, json={"run_id": "r-1", "status": "failed"})
        return httpx.Response(404, json={})

    node = booted(tmp_path)  # nothing on the console: the answers come from the master
    assert waiting.met("heartbeat", node, api(handler)) == "heartbeat"
    assert waiting.met("report", node, api(handler)) == "report (failed)"
    assert node.run_status == "failed" and node.summary()["run_status"] == "failed"


def test_a_heartbeat_of_the_nodes_previous_run_is_not_this_ones(tmp_path: Path) -> None:
    """The node id was booted before: the master still lists that run's node alive."""
    earlier = [{"node_id": "n-1", "run_id": "r-0", "state": "done", "alive": True}]
    master = api(lambda request: httpx.Response(200, json=earlier))
    assert waiting.met("heartbeat", booted(tmp_path, STARTING), master) is None


def test_a_report_not_stored_yet_is_still_awaited(tmp_path: Path) -> None:
    node = booted(tmp_path, STARTING + DONE)  # the master, not the console, decides
    master = api(lambda request: httpx.Response(404, json={"error": "no such run"}))
    assert waiting.met("report", node, master) is None
    assert node.run_status is None


@pytest.mark.parametrize(
    ("statuses", "failed"),
    [
        (["succeeded", "succeeded"], None),
        (["succeeded", "failed"], "n-2 (failed)"),
        (["cancelled", None], "n-1 (cancelled), n-2 (None)"),
    ],
)
def test_check_runs_fails_unless_every_run_succeeded(
    tmp_path: Path, statuses: list[str | None], failed: str | None
) -> None:
    nodes = []
    for i, status in enumerate(statuses, 1):
        node = booted(tmp_path, node_id=f"n-{i}")
        node.run_status = status
        nodes.append(node)
    if failed is None:
        waiting.check_runs(nodes)
        return
    with pytest.raises(waiting.RunFailed) as info:
        waiting.check_runs(nodes)
    assert info.value.exit_code == 1
    assert info.value.format_message() == f"the run did not succeed on node(s): {failed}"


def test_a_refused_admin_token_is_a_clear_error(tmp_path: Path) -> None:
    master = api(lambda request: httpx.Response(401, json={"error": "bad token"}))
    with pytest.raises(click.ClickException, match="refused the admin token"):
        waiting.met("report", booted(tmp_path), master)


def test_timeout_shows_the_last_console_lines(tmp_path: Path) -> None:
    node = booted(tmp_path, "".join(f"boot line {i}\n" for i in range(40)))
    with pytest.raises(waiting.BootTimeout) as info:
        waiting.wait_for("ssh", 0.5, [node], lambda _: None)
    message = info.value.format_message()
    assert "timed out after 0 s waiting for 'ssh' on n-1" in message
    assert "boot line 39" in message and "boot line 10" not in message
    assert info.value.exit_code == 1


def test_a_vm_that_ends_early_fails_at_once(tmp_path: Path) -> None:
    node = booted(tmp_path, STARTING, running=False)
    with pytest.raises(waiting.BootTimeout, match="stopped before 'report'"):
        waiting.wait_for("report", 3600, [node], lambda _: None)


class StopsWhenAsked(FakeMachine):
    """A VM that ends right after its first `running()` answer."""

    def running(self) -> bool:
        was_running = self.is_running
        self.is_running = False
        return was_running


@pytest.mark.parametrize("wait", ["poweroff", "report"])
def test_a_vm_that_ends_while_meeting_the_condition_meets_it(tmp_path: Path, wait: str) -> None:
    node = booted(tmp_path, STARTING + DONE)
    node.machine = StopsWhenAsked()
    waiting.wait_for(wait, 3600, [node], lambda _: None)
    assert node.outcome == {"poweroff": "powered off", "report": "report (succeeded)"}[wait]
