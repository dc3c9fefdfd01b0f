"""The device store on a real SQLite file and a real PostgreSQL server (a private cluster
on loopback): one upsert decides created or replaced, also when several writers (server
replicas) race on one id."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefactory.server.device_store import DeviceStore
from imagefactory.server.storage import Storage
from tests.integration.postgres_cluster import running_postgres

SPEC = {"arch": "x86_64", "kinds": ["vm"], "libvirt": {"uri": "qemu:///system", "pool": "p"},
        "container": None, "ssh": None}  # fmt: skip
DEPLOYMENT = {"kind": "vm", "target": "x86_64-linux", "environment": "sha256:" + "0" * 64,
              "node_id": "n-1", "run_id": "r-1", "details": {"volumes": ["a", "b"]}}  # fmt: skip


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'services.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = Storage(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM devices")
    try:
        yield store
    finally:
        store.close()


def test_put_replace_deploy_delete(storage: Storage) -> None:
    devices = DeviceStore(storage.engine)
    first, created = devices.put("edge-1", SPEC)
    assert created and first == {"id": "edge-1", **SPEC, "deployment": None,
                                 "created_at": first["created_at"],
                                 "updated_at": first["created_at"]}  # fmt: skip
    assert devices.set_deployment("edge-1", DEPLOYMENT) is not None
    second, created = devices.put("edge-1", {**SPEC, "kinds": ["vm"], "libvirt": None})
    assert not created and second["libvirt"] is None
    deployment = second["deployment"]
    assert {k: v for k, v in deployment.items() if k != "deployed_at"} == DEPLOYMENT
    assert devices.listing() == [second] and devices.get("edge-1") == second
    assert not devices.delete("edge-1", if_undeployed=True), "it has a deployment"
    assert devices.set_deployment("edge-1", None) is not None
    assert devices.get("edge-1")["deployment"] is None  # type: ignore[index]
    assert devices.set_deployment("nope", DEPLOYMENT) is None
    assert devices.delete("edge-1", if_undeployed=True) and not devices.delete("edge-1")
    assert devices.get("edge-1") is None and devices.listing() == []


def test_racing_writers_create_once(storage: Storage) -> None:
    """Eight writers, each with its own store on the one database, put the same new id:
    exactly one of them created it."""
    url = storage.engine.url.render_as_string(hide_password=False)
    stores = [Storage(url) for _ in range(8)]
    outcomes: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def write(store: Storage) -> None:
        barrier.wait()
        outcomes.append(DeviceStore(store.engine).put("raced", SPEC)[1])

    threads = [threading.Thread(target=write, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for store in stores:
        store.close()
    assert sorted(outcomes) == [False] * 7 + [True]
