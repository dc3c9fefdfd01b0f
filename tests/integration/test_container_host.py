"""A container host pulls by digest and runs the node: a real `bake --format oci` image
pushed with skopeo to a real docker-registry on loopback, place_container with runc on
`local` against a real `imagefactory serve`; the node heartbeats and reports, and
remove_container leaves no container, namespace, forwarder or node directory. A wrong
digest and a registry that is down are one line each."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from imagefactory.boot import runc, seed
from imagefactory.boot.waiting import MasterApi
from imagefactory.builder.push import push_oci
from imagefactory.deploy.container_host import place_container, remove_container
from imagefactory.errors import UserError
from imagefactory.targets import get_target
from tests.e2e.fleet import report
from tests.integration.oci_image import REPO, bake_oci
from tests.integration.services_harness import ServerProcess, free_port
from tests.integration.test_build_registry import registry  # noqa: F401 (a fixture)
from tests.integration.test_container_nodes import server  # noqa: F401 (a fixture)
from tests.processes import process_alive

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(p) for p in ("runc", "skopeo", "umoci")),
        reason="needs root, runc, skopeo and umoci (scripts/setup-host.sh)",
    ),
    pytest.mark.timeout(1200),  # a first bake builds the container base
]
TARGET = get_target("x86_64-linux")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bake_oci(REPO / "examples" / "hello", tmp_path_factory.mktemp("oci")).dir


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own cache and state directories (pulled layouts, node directories)."""
    monkeypatch.setenv("IMAGEFACTORY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path


@pytest.fixture
def pushed(image: Path, registry: str) -> tuple[str, str]:  # noqa: F811
    """(`HOST:PORT/fleetbake/hello`, the manifest digest) of the image in the registry."""
    done = push_oci(image, registry, "fleetbake/hello:b1")
    return done["reference"].removesuffix(":b1"), done["digest"]


def node(master: ServerProcess, node_id: str, run_id: str) -> seed.NodeVars:
    return seed.NodeVars(
        node_id=node_id, run_id=run_id, token=master.node_token(node_id), on_complete="none"
    )


def wait_until(what: str, check: MasterApi, node_id: str, run_id: str) -> None:
    deadline = time.monotonic() + 300
    seen_alive = False
    while time.monotonic() < deadline:
        seen_alive = seen_alive or check.alive(node_id, run_id)
        if seen_alive and check.run_status(run_id) is not None:
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (heartbeat seen: {seen_alive})")


def test_runc_host_pulls_by_digest_runs_and_removes_the_node(
    pushed: tuple[str, str],
    server: ServerProcess,  # noqa: F811
    homes: Path,
) -> None:
    repo, digest = pushed
    reference = f"http://{repo}@{digest}"
    lines: list[str] = []

    def place(node_id: str) -> dict[str, Any]:
        vars_ = node(server, node_id, f"r{node_id}")
        return place_container("local", "runc", reference, TARGET, vars_, server.url, lines.append)

    details = place("ch-1")
    name, workdir = "fleetbake-ch-1", Path(details["workdir"])
    try:
        assert details["reference"] == f"{repo}@{digest}"
        assert {k: details[k] for k in ("host", "runtime", "container", "node_id")} == {
            "host": "local", "runtime": "runc", "container": name, "node_id": "ch-1",
        }  # fmt: skip
        layout = homes / "cache" / "oci-pulled" / digest.removeprefix("sha256:")
        assert runc.manifest_digest(layout) == digest
        assert any(line.startswith("pulling ") for line in lines), lines
        api = MasterApi(server.url, server.admin_token)
        try:
            wait_until("the report", api, "ch-1", "rch-1")
        finally:
            api.client.close()
        doc = report(server, "rch-1")
        assert doc["status"] == "succeeded" and doc["node_id"] == "ch-1"
        assert "from node ch-1 (run rch-1)" in doc["tasks"]["hello"]["result"]
        forwarder = json.loads((workdir / "node.json").read_text())["forwarder_pid"]
        assert process_alive(forwarder)
    finally:
        remove_container(details, lines.append)
    assert runc.state(name) is None
    assert not Path("/run/netns/fleetbake-ch-1").exists()
    assert not process_alive(forwarder)
    assert not workdir.exists()
    remove_container(details, lines.append)  # again: what is gone already is fine
    assert lines[-1] == "node ch-1: container fleetbake-ch-1 removed from local"

    # A second node of the same digest uses the pulled layout.
    remove_container(place("ch-2"), lines.append)
    assert f"{reference.removeprefix('http://')}: in the cache" in lines


def test_a_wrong_digest_is_one_line(
    pushed: tuple[str, str],
    server: ServerProcess,  # noqa: F811
    homes: Path,
) -> None:
    repo, _ = pushed
    wrong = f"http://{repo}@sha256:{'0' * 64}"
    with pytest.raises(UserError) as raised:
        place_container("local", "runc", wrong, TARGET, node(server, "w", "rw"), None, print)
    message = raised.value.format_message()
    assert message.startswith(f"cannot pull {repo}@sha256:") and "\n" not in message
    assert not (homes / "state" / "imagefactory" / "nodes" / "w").exists()
    assert not Path("/run/netns/fleetbake-w").exists()


def test_a_registry_that_is_down_is_one_line(
    server: ServerProcess,  # noqa: F811
    homes: Path,
) -> None:
    down = f"http://127.0.0.1:{free_port()}/fleetbake/hello@sha256:{'a' * 64}"
    with pytest.raises(UserError) as raised:
        place_container("local", "runc", down, TARGET, node(server, "d", "rd"), None, print)
    message = raised.value.format_message()
    assert message.startswith("cannot pull 127.0.0.1:") and "\n" not in message
    assert "connection refused" in message.lower(), message
