"""End to end: bake examples/etl, serve core services on loopback, boot nodes with their
IDs from cloud-init, and check what they reported. The proof that the product works."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.baking import BakeImage
from tests.e2e import fleet
from tests.integration.services_harness import ServerProcess, free_port

# The first test that needs the image also pays for the bake (a cold base under load: ~10 min).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

ETL = fleet.REPO / "examples" / "etl"
FAILING = fleet.REPO / "examples" / "failing"
HEARTBEAT_S = 2
"""Short heartbeats, so that `alive` (3 x interval) turns false soon after power-off."""


def _fail_with_consoles(message: str, boots: list[fleet.Boot]) -> None:
    consoles = "\n\n".join(
        f"--- {b.node_id} console (last lines) ---\n{b.console_tail()}" for b in boots
    )
    pytest.fail(f"{message}\n{consoles}")


def _wait_all(boots: list[fleet.Boot]) -> None:
    failures = []
    for b in boots:
        code, err = b.wait()
        if code != 0:
            failures.append(f"boot of {b.node_id} exited {code}: {err.strip()[-2000:]}")
    if failures:
        _fail_with_consoles("\n".join(failures), boots)


def _stop_all(boots: list[fleet.Boot]) -> None:
    for b in boots:
        b.stop()


@pytest.mark.parametrize("backend", ["qemu", "libvirt"])
@pytest.mark.parametrize("target_name", fleet.TARGETS)
def test_two_nodes_run_etl_and_report(
    bake_image: BakeImage,
    server: ServerProcess,
    tmp_path: Path,
    backend: str,
    target_name: str,
) -> None:
    image = bake_image(ETL, target_name).image
    greeting = 'hello "fleet" $HOME `x` = y'
    specs = [(f"e2e-{backend}-{i}", f"run-{uuid.uuid4().hex[:12]}") for i in (1, 2)]
    boots: list[fleet.Boot] = []
    try:
        with fleet.NodeWatcher(server) as watcher:
            for node_id, run_id in specs:
                boots.append(
                    fleet.boot(
                        image, server.url, server.secret_file, node_id, run_id,
                        tmp_path / node_id, backend=backend,
                        env={"ETL_GREETING": greeting, "EXECUTOR_HEARTBEAT_S": str(HEARTBEAT_S)},
                    )
                )  # fmt: skip
            _wait_all(boots)
    finally:
        _stop_all(boots)

    for node_id, run_id in specs:
        got = fleet.report(server, run_id)
        log = fleet.combined_log(server, run_id)
        fleet.save_artifacts(f"etl-{backend}", boots, {f"{run_id}.log": log})
        assert got["status"] == "succeeded", got
        assert (got["node_id"], got["run_id"]) == (node_id, run_id)
        assert {t["status"] for t in got["tasks"].values()} == {"succeeded"}
        assert got["tasks"]["greet"]["result"] == greeting
        summary = got["tasks"]["report"]["result"]
        assert summary["enriched"] == {"count": 5, "sum": 55, "mean": 11.0}  # via ctx.events
        assert summary["validated"] == 5  # via ctx.store.incr
        assert summary["stored_records"] == 5  # via ctx.store
        assert (summary["node_id"], summary["run_id"]) == (node_id, run_id)
        assert "task:extract out extracted 5 records" in log
        assert "task:validate err warning: odd value in record 1" in log
        assert "task:validate log " in log
        assert " executor log " in log
        # Heartbeats arrived while the node ran, not only at the end.
        assert watcher.seen.get(node_id, set()) & {"starting", "running", "reporting"}, watcher.seen

    time.sleep(3 * HEARTBEAT_S + 1)
    rows = fleet.nodes(server)
    for node_id, _ in specs:
        assert rows[node_id]["alive"] is False, rows[node_id]


def _pack(pipeline: Path, out: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "executor", "pack", str(pipeline), "-o", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()[0]


def test_failing_pipeline_from_gateway_reports_failure_and_powers_off(
    bake_image: BakeImage, server: ServerProcess, tmp_path: Path
) -> None:
    image = bake_image(ETL, "x86_64-linux").image
    archive = tmp_path / "failing.tar.gz"
    sha = _pack(FAILING, archive)
    published = fleet.admin(server, "publish", "failing", str(archive))
    assert published.returncode == 0, published.stderr
    node_id, run_id = "e2e-failing", f"run-{uuid.uuid4().hex[:12]}"
    env = {"EXECUTOR_PIPELINE": "gateway:failing", "EXECUTOR_PIPELINE_SHA256": sha}
    b = fleet.boot(image, server.url, server.secret_file, node_id, run_id, tmp_path / "n", env=env)
    try:
        _wait_all([b])  # --wait poweroff: the node powered off after delivering
    finally:
        b.stop()
    got = fleet.report(server, run_id)
    fleet.save_artifacts("failing", [b], {f"{run_id}.log": fleet.combined_log(server, run_id)})
    assert got["status"] == "failed"
    assert got["pipeline"] == "failing"
    explode = got["tasks"]["explode"]
    assert (explode["status"], explode["attempts"]) == ("failed", 2)
    assert explode["error"]["type"] == "RuntimeError"
    assert "boom on attempt 2" in explode["error"]["message"]
    assert got["tasks"]["publish"]["status"] == "upstream_failed"
    assert got["tasks"]["cleanup"]["status"] == "succeeded"


def test_report_arrives_when_the_master_comes_up_late(
    bake_image: BakeImage, tmp_path: Path
) -> None:
    image = bake_image(ETL, "x86_64-linux").image
    late = fleet.prepared_server(tmp_path / "master", port=free_port())
    node_id, run_id = "e2e-late", f"run-{uuid.uuid4().hex[:12]}"
    b = fleet.boot(
        image, f"http://127.0.0.1:{late.port}", late.secret_file, node_id, run_id, tmp_path / "n",
        env={"EXECUTOR_HEARTBEAT_S": str(HEARTBEAT_S)},
    )  # fmt: skip
    try:
        if not fleet.wait_for_console(b, "EXECUTOR-STATUS", fleet.BOOT_TIMEOUT_S):
            _fail_with_consoles("the agent never started", [b])
        time.sleep(10)  # the agent runs with the master still down for a while
        late.start()
        _wait_all([b])
        got = fleet.report(late, run_id)
    finally:
        b.stop()
        late.stop()
    assert got["status"] == "succeeded"
    assert got["run_id"] == run_id
