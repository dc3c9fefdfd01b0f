"""The device inventory API in process (Starlette TestClient) over a real SQLite file:
create, replace, list, show, delete, the deployment record, and every refusal."""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagefactory.server.app import create_app
from imagefactory.server.config import ServerConfig, database_url
from imagefactory.tokens import node_token

SECRET = "fleet-secret"
ADMIN = {"Authorization": "Bearer admin-token"}
FINGERPRINT = "SHA256:" + "A" * 42 + "E"
DIGEST = "sha256:" + "ab" * 32
EVERY_KIND: dict[str, Any] = {
    "arch": "x86_64",
    "kinds": ["vm", "container", "baremetal"],
    "libvirt": {"uri": "qemu+ssh://root@hv1:2222/system?keyfile=/root/.ssh/id_ed25519"},
    "container": {"host": "local", "runtime": "runc"},
    "ssh": {"address": "root@10.0.0.7:22", "host_key_fingerprint": FINGERPRINT},
    "master_url": "https://10.0.0.5:8750",
}
DEPLOYMENT: dict[str, Any] = {
    "kind": "vm",
    "target": "x86_64-linux",
    "environment": DIGEST,
    "node_id": "edge-1-3f9c2a",
    "run_id": "0f6c1f8e-8f0e-4a3e-9a55-3c1d8e2b7a10",
    "details": {"uri": "qemu:///system", "domain": "fleetbake-edge-1-3f9c2a",
                "volumes": ["edge-1-3f9c2a.qcow2", "edge-1-3f9c2a-seed.iso"]},
}  # fmt: skip


def make_client(tmp_path: Path, formats: tuple[str, ...]) -> TestClient:
    config = ServerConfig(
        db_url=database_url(str(tmp_path / "services.db")),
        secret=SECRET,
        admin_token="admin-token",
        store_dir=tmp_path / "store",
        formats=formats,
    )
    return TestClient(create_app(config))


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, ("qcow2", "raw", "oci", "installer")) as test_client:
        yield test_client


def put(client: TestClient, device_id: str, body: Any, **headers: str) -> Any:
    return client.put(f"/v1/devices/{device_id}", json=body, headers={**ADMIN, **headers})


def changed(**changes: Any) -> dict[str, Any]:
    body = copy.deepcopy(EVERY_KIND)
    body.update(changes)
    return {k: v for k, v in body.items() if v is not ...}


def test_create_replace_list_show_delete(client: TestClient, tmp_path: Path) -> None:
    created = put(client, "edge-1", EVERY_KIND)
    assert created.status_code == 201, created.text
    device = created.json()
    assert device["id"] == "edge-1" and device["deployment"] is None
    assert device["libvirt"] == {**EVERY_KIND["libvirt"], "pool": "default"}
    assert {k: device[k] for k in ("arch", "kinds", "container", "ssh")} == {
        k: EVERY_KIND[k] for k in ("arch", "kinds", "container", "ssh")
    }
    assert device["created_at"] == device["updated_at"]

    only_vm = {"arch": "x86_64", "kinds": ["vm"], "libvirt": {"uri": "qemu:///system",
                                                              "pool": "fleet"}}  # fmt: skip
    replaced = put(client, "edge-1", only_vm)
    assert replaced.status_code == 200, replaced.text
    again = replaced.json()
    assert again["kinds"] == ["vm"] and again["libvirt"]["pool"] == "fleet"
    assert again["container"] is None and again["ssh"] is None, "a replace is whole"
    assert again["created_at"] == device["created_at"] < again["updated_at"]

    assert put(client, "a-device", changed(kinds=["container"])).status_code == 201
    listed = client.get("/v1/devices", headers=ADMIN).json()
    assert [d["id"] for d in listed] == ["a-device", "edge-1"]
    assert client.get("/v1/devices/edge-1", headers=ADMIN).json() == again

    deleted = client.delete("/v1/devices/edge-1", headers=ADMIN)
    assert deleted.status_code == 204 and deleted.content == b""
    assert client.get("/v1/devices/edge-1", headers=ADMIN).status_code == 404
    gone = client.delete("/v1/devices/edge-1", headers=ADMIN)
    assert gone.status_code == 404 and gone.json() == {"error": "no device edge-1"}
    with sqlite3.connect(tmp_path / "services.db") as db:
        assert [r[0] for r in db.execute("SELECT device_id FROM devices")] == ["a-device"]
    recreated = put(client, "edge-1", only_vm)
    assert recreated.status_code == 201, "created again after the delete"


def test_a_reservation_takes_only_a_device_without_a_deployment(client: TestClient) -> None:
    """deploy reserves with PUT ...?if_undeployed=true before it places anything: a second
    deploy beside it gets 409, and the first deploy's record is what stays."""
    assert put(client, "edge-1", EVERY_KIND).status_code == 201
    url = "/v1/devices/edge-1/deployment?if_undeployed=true"
    assert client.put(url, json=DEPLOYMENT, headers=ADMIN).status_code == 200
    second = client.put(url, json={**DEPLOYMENT, "node_id": "edge-1-000000"}, headers=ADMIN)
    assert second.status_code == 409
    node = DEPLOYMENT["node_id"]
    assert second.json() == {"error": f"device edge-1 has a deployment (node {node})"}
    held = client.get("/v1/devices/edge-1", headers=ADMIN).json()["deployment"]
    assert held["node_id"] == node
    missing = client.put("/v1/devices/nope/deployment?if_undeployed=true", json=DEPLOYMENT,
                         headers=ADMIN)  # fmt: skip
    assert missing.status_code == 404


def test_deployment_is_recorded_kept_on_replace_and_cleared(client: TestClient) -> None:
    assert put(client, "edge-1", EVERY_KIND).status_code == 201
    url = "/v1/devices/edge-1/deployment"
    recorded = client.put(url, json=DEPLOYMENT, headers=ADMIN)
    assert recorded.status_code == 200, recorded.text
    deployment = recorded.json()["deployment"]
    assert {k: v for k, v in deployment.items() if k != "deployed_at"} == DEPLOYMENT
    assert deployment["deployed_at"].endswith("Z")

    assert put(client, "edge-1", changed(kinds=["vm"])).status_code == 200
    shown = client.get("/v1/devices/edge-1", headers=ADMIN).json()
    assert shown["deployment"] == deployment, "replacing the device keeps its deployment"
    listed = client.get("/v1/devices", headers=ADMIN).json()
    assert listed[0]["deployment"] == deployment

    guarded = client.delete("/v1/devices/edge-1", params={"if_undeployed": "true"}, headers=ADMIN)
    assert guarded.status_code == 409, guarded.text
    assert guarded.json() == {"error": "device edge-1 has a deployment: undeploy it first"}
    assert client.get("/v1/devices/edge-1", headers=ADMIN).json()["deployment"] == deployment

    for _ in range(2):  # clearing is idempotent
        cleared = client.delete(url, headers=ADMIN)
        assert cleared.status_code == 204 and cleared.content == b""
        assert client.get("/v1/devices/edge-1", headers=ADMIN).json()["deployment"] is None

    unknown = client.delete("/v1/devices/nope", params={"if_undeployed": "true"}, headers=ADMIN)
    assert unknown.status_code == 404
    undeployed = client.delete("/v1/devices/edge-1?if_undeployed=true", headers=ADMIN)
    assert undeployed.status_code == 204 and client.get("/v1/devices", headers=ADMIN).json() == []

    for method in ("put", "delete"):
        kwargs: dict[str, Any] = {"json": DEPLOYMENT} if method == "put" else {}
        unknown = client.request(method, "/v1/devices/nope/deployment", headers=ADMIN, **kwargs)
        assert unknown.status_code == 404 and unknown.json() == {"error": "no device nope"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (changed(arch="riscv64"), "no target runs vm/container/baremetal on riscv64"),
        (changed(kinds=["vm", "fpga"]), "invalid kinds.1: Input should be 'vm'"),
        (changed(kinds=[]), "invalid kinds: List should have at least 1 item"),
        (changed(kinds=["vm", "container", "vm"]), "name a kind twice"),
        (changed(libvirt=...), "kind vm needs 'libvirt'"),
        (changed(libvirt=None), "kind vm needs 'libvirt'"),
        (changed(container=...), "kind container needs 'container'"),
        (changed(ssh=...), "kind baremetal needs 'ssh'"),
        (changed(container={"host": "ssh://ops@edge-7", "runtime": "runc"}),
         "runtime runc runs containers on the local host only"),
        (changed(container={"host": "ssh://ops@edge-7"}), "runtime runc runs containers"),
        (changed(container={"host": "local", "runtime": "lxc"}), "invalid container.runtime"),
        (changed(container={"host": "tcp://10.0.0.1:2375", "runtime": "docker"}),
         "is not local or ssh://"),
        (changed(libvirt={"uri": "qemu+ssh://h/system?command=/tmp/evil"}),
         "libvirt URI parameter 'command' is not allowed"),
        (changed(libvirt={"uri": "qemu+tcp://h/system"}), "is not qemu:///system or"),
        (changed(libvirt={"uri": "qemu:///session"}), "is not qemu:///system or"),
        (changed(libvirt={"uri": "qemu+ssh://-oProxyCommand=x/system"}), "is not qemu:///"),
        (changed(libvirt={"uri": "qemu+ssh://h:70000/system"}), "port 70000 is not 1-65535"),
        (changed(libvirt={"uri": "qemu:///system", "pool": "../etc"}), "invalid libvirt.pool"),
        (changed(libvirt={"uri": "qemu:///system", "network": "x"}), "invalid libvirt.network"),
        (changed(ssh={"address": "10.0.0.7"}), "is not USER@HOST[:PORT]"),
        (changed(ssh={"address": "root@h\nx"}), "is not USER@HOST[:PORT]"),
        (changed(ssh={"address": "root@h", "host_key_fingerprint": "MD5:aa"}),
         "invalid ssh.host_key_fingerprint"),
        (changed(master_url="http://m/$(reboot)"),
         "is not http[s]://HOST[:PORT][/PATH]"),
        (changed(colour="red"), "invalid colour: Extra inputs are not permitted"),
        (changed(arch="x" * 200), "invalid arch"),
        ([EVERY_KIND], "invalid body"),
    ],
)  # fmt: skip
def test_refusals(client: TestClient, tmp_path: Path, body: Any, message: str) -> None:
    refused = put(client, "edge-1", body)
    assert refused.status_code == 400, refused.text
    assert message in refused.json()["error"]
    assert "\n" not in refused.json()["error"]
    assert client.get("/v1/devices", headers=ADMIN).json() == [], "nothing was stored"


def test_no_matching_target_lists_what_is_supported(tmp_path: Path) -> None:
    with make_client(tmp_path, ("qcow2", "oci")) as client:
        refused = put(client, "edge-1", changed(kinds=["baremetal"]))
        assert refused.status_code == 400
        assert refused.json()["error"] == (
            "no target runs baremetal on x86_64: supported are "
            "x86_64: vm, container; aarch64: vm, container"
        )
        fallback = put(client, "edge-1", changed(kinds=["baremetal", "container"]))
        assert fallback.status_code == 201, "one kind with a target is enough"


@pytest.mark.parametrize("device_id", ["-edge", ".hidden", "a" * 129, "edge 1", "edge%2F1", "édge"])
def test_hostile_ids_are_refused(client: TestClient, device_id: str) -> None:
    refused = put(client, device_id, EVERY_KIND)
    assert refused.status_code in (400, 404), refused.text
    assert client.get("/v1/devices", headers=ADMIN).json() == []


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "tape"},
        {"environment": "sha256:abc"},
        {"node_id": "../x"},
        {"target": ""},
        {"details": {"k": 1}},
        {"details": {"k": "line\nbreak"}},
        {"details": {"k": "\ud800"}},
        {"details": {"": "empty key"}},
        {"details": {f"k{i}": "v" for i in range(65)}},
        {"details": {"k": ["v"] * 65}},
        {"details": {"k": "v" * 4097}},
        {"details": {"line\nbreak": "v"}},
        {"details": {"k" * 129: "v"}},
        {"details": {"k": [["nested"]]}},
        {"details": ["k"]},
        {"extra": True},
    ],
)
def test_deployment_refusals(client: TestClient, changes: dict[str, Any]) -> None:
    assert put(client, "edge-1", EVERY_KIND).status_code == 201
    body = json.dumps({**DEPLOYMENT, **changes})  # ASCII: a lone surrogate as its escape
    headers = {**ADMIN, "Content-Type": "application/json"}
    refused = client.put("/v1/devices/edge-1/deployment", content=body, headers=headers)
    assert refused.status_code == 400, refused.text
    assert "\n" not in refused.json()["error"]
    if "details" in changes:
        assert refused.json()["error"].startswith("invalid details: "), refused.text
    assert client.get("/v1/devices/edge-1", headers=ADMIN).json()["deployment"] is None


ENDPOINTS = [
    ("put", "/v1/devices/edge-1", EVERY_KIND),
    ("get", "/v1/devices", None),
    ("get", "/v1/devices/edge-1", None),
    ("delete", "/v1/devices/edge-1", None),
    ("put", "/v1/devices/edge-1/deployment", DEPLOYMENT),
    ("delete", "/v1/devices/edge-1/deployment", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_admin_only(client: TestClient, method: str, path: str, body: Any) -> None:
    assert put(client, "edge-1", EVERY_KIND).status_code == 201
    node = node_token(SECRET, "edge-1")
    cases = [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Bearer {node}"}, 401),
        ({"Authorization": f"Bearer {node}", "X-Node-ID": "edge-1"}, 403),
    ]
    for headers, status in cases:
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            # An invalid body too: the token is checked first.
            kwargs["json"] = {"nonsense": True}
        answer = client.request(method, path, **kwargs)
        assert answer.status_code == status, (headers, answer.text)
    stored = client.get("/v1/devices/edge-1", headers=ADMIN).json()
    assert stored["kinds"] == EVERY_KIND["kinds"] and stored["deployment"] is None
