"""Container nodes on real runc against a real `imagefactory serve` on loopback: two
containers report with their own identities, a failing pipeline is reported failed,
SIGTERM gives a cancelled report, nothing but the master is reachable, and a run without
a master leaves its results in the node's state directory."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefactory.bake.options import BakeResult
from tests.e2e.fleet import combined_log, prepared_server, report
from tests.integration.oci_image import (
    REPO,
    bake_oci,
    imagefactory,
    numpy_pipeline,
    probe_pipeline,
    slow_pipeline,
)
from tests.integration.services_harness import ServerProcess

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("runc") is None,
        reason="container nodes need root and runc (scripts/setup-host.sh installs runc)",
    ),
    pytest.mark.timeout(1200),  # a first bake builds the container base
]
TIMEOUT_S = "300"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("oci-images")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = prepared_server(tmp_path / "server").start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def state_home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "xdg-state"
    yield home
    # Whatever a failed test left running is stopped, by the product's own command.
    imagefactory("stop", "--all", state_home=home)


def boot(image: BakeResult, state_home: Path, *args: str) -> tuple[int, str, str]:
    result = imagefactory("boot", str(image.dir), *args, state_home=state_home, timeout_s=900)
    return result.returncode, result.stdout, result.stderr


def master_args(server: ServerProcess) -> list[str]:
    return [
        "--master", server.url, "--secret-file", str(server.secret_file),
        "--admin-token-file", str(server.admin_token_file),
    ]  # fmt: skip


def console(state_home: Path, node_id: str) -> str:
    log = state_home / "imagefactory" / "nodes" / node_id / "console.log"
    return log.read_text(errors="replace") if log.exists() else "(no console.log)"


def test_two_containers_report_with_distinct_identities(
    images: Path, server: ServerProcess, state_home: Path
) -> None:
    image = bake_oci(REPO / "examples" / "hello", images)
    code, out, err = boot(
        image, state_home, "--runtime", "runc", "--node-id", "edge", "--run-id", "r2",
        "--count", "2", *master_args(server), "--wait", "report", "--timeout", TIMEOUT_S,
        "--json",
    )  # fmt: skip
    assert code == 0, err + console(state_home, "edge-1")
    summary = json.loads(out)
    assert [n["node_id"] for n in summary] == ["edge-1", "edge-2"]
    assert all(n["run_status"] == "succeeded" and n["backend"] == "runc" for n in summary)
    for i in (1, 2):
        doc = report(server, f"r2-{i}")
        assert doc["status"] == "succeeded" and doc["node_id"] == f"edge-{i}"
        greeting = doc["tasks"]["hello"]["result"]
        assert f"from node edge-{i} (run r2-{i})" in greeting
    # Not kept: containers, namespaces and forwarders are gone; output and state stay.
    node_dir = state_home / "imagefactory" / "nodes" / "edge-1"
    assert sorted(p.name for p in node_dir.iterdir()) == ["console.log", "state"]
    assert not Path("/run/netns/fleetbake-edge-1").exists()


def test_failing_pipeline_is_reported_failed(
    images: Path, server: ServerProcess, state_home: Path
) -> None:
    image = bake_oci(REPO / "examples" / "failing", images)
    code, _, err = boot(
        image, state_home, "--node-id", "bad", "--run-id", "rf", *master_args(server),
        "--wait", "report", "--timeout", TIMEOUT_S,
    )  # fmt: skip
    assert code == 1 and "bad (failed)" in err, err
    assert report(server, "rf")["status"] == "failed"


def test_sigterm_delivers_a_cancelled_report(
    images: Path, tmp_path: Path, server: ServerProcess, state_home: Path
) -> None:
    image = bake_oci(slow_pipeline(tmp_path / "slow"), images)
    code, _, err = boot(
        image, state_home, "--node-id", "slow", "--run-id", "rs", *master_args(server),
        "--wait", "heartbeat", "--keep", "--timeout", TIMEOUT_S,
    )  # fmt: skip
    assert code == 0, err
    stop = imagefactory("stop", "slow", state_home=state_home, timeout_s=120)
    assert stop.returncode == 0, stop.stderr
    doc = report(server, "rs")
    assert doc["status"] == "cancelled", console(state_home, "slow")
    assert doc["tasks"]["wait"]["status"] == "cancelled"
    assert "received SIGTERM: cancelling the run" in combined_log(server, "rs")
    assert "state=cancelled" in console(state_home, "slow")
    assert not Path("/run/netns/fleetbake-slow").exists()


def test_only_the_master_is_reachable(
    images: Path, tmp_path: Path, server: ServerProcess, state_home: Path
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_server(("127.0.0.1", 0)) as other:  # another service on the host
        other_port = other.getsockname()[1]
        targets = [
            f"127.0.0.1:{port}",  # the master
            f"127.0.0.1:{other_port}",  # the host's other loopback services
            f"{host_address()}:{port}",  # the master by the host's own address
            "10.0.2.2:80",  # QEMU's host alias
            "1.1.1.1:443",  # the outside world
        ]
        image = bake_oci(probe_pipeline(tmp_path / "probe", targets), images)
        code, _, err = boot(
            image, state_home, "--node-id", "probe", "--run-id", "rp", *master_args(server),
            "--wait", "report", "--timeout", TIMEOUT_S,
        )  # fmt: skip
    assert code == 0, err + console(state_home, "probe")
    found = report(server, "rp")["tasks"]["probe"]["result"]
    assert found.pop(f"127.0.0.1:{port}") == "connected"
    assert found and all(outcome != "connected" for outcome in found.values()), found


def host_address() -> str:
    """An address of this host other than loopback (or a documentation one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent for UDP connect
            return str(s.getsockname()[0])
        except OSError:
            return "192.0.2.1"


def run_alone(image: BakeResult, state_home: Path, node_id: str, run_id: str) -> Path:
    """Boot one node without a master until its container exits; its run's directory."""
    code, out, err = boot(
        image, state_home, "--node-id", node_id, "--run-id", run_id, "--wait", "exit",
        "--timeout", TIMEOUT_S, "--json",
    )  # fmt: skip
    assert code == 0, err + console(state_home, node_id)
    assert json.loads(out)[0]["agent_state"] == "succeeded"
    return state_home / "imagefactory" / "nodes" / node_id / "state" / "runs" / run_id


def test_without_a_master_results_stay_in_the_state_volume(images: Path, state_home: Path) -> None:
    run_dir = run_alone(bake_oci(REPO / "examples" / "hello", images), state_home, "alone", "ra")
    results = json.loads((run_dir / "results.json").read_text())
    assert "from node alone (run ra)" in json.dumps(results)
    assert "hello, fleet" in (run_dir / "combined.log").read_text()


def test_a_container_that_ends_early_shows_its_last_lines(
    images: Path, server: ServerProcess, state_home: Path
) -> None:
    image = bake_oci(REPO / "examples" / "hello", images)
    code, _, err = boot(
        image, state_home, "--node-id", "early", "--env", "EXECUTOR_HEARTBEAT_S=-1",
        *master_args(server), "--wait", "heartbeat", "--timeout", TIMEOUT_S,
    )  # fmt: skip
    assert code == 1 and "node early stopped before 'heartbeat'" in err, err
    # The agent's own message, from the tail of the container's output.
    assert "| executor agent: error: EXECUTOR_HEARTBEAT_S" in err


def test_pipeline_requirements_go_into_the_image(
    images: Path, tmp_path: Path, state_home: Path
) -> None:
    """numpy from requirements.txt: its wheel for the image's platform, installed by the
    bake (offline, hash-checked), imports and runs in the container."""
    image = bake_oci(numpy_pipeline(tmp_path / "npsum"), images)
    assert (image.dir / "requirements.lock").is_file() and (image.dir / "sbom.cdx.json").is_file()
    assert "numpy" in (image.dir / "requirements.lock").read_text()
    run_dir = run_alone(image, state_home, "num", "rn")
    result = json.loads((run_dir / "results.json").read_text())["tasks"]["total"]["result"]
    assert result["sum"] == 499500
