"""The storage layer and two `imagefactory serve` replicas on a real PostgreSQL server
(a private cluster in a temporary directory, on loopback, stopped afterwards)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagefactory.server.storage import HeartbeatRow, Storage
from tests.integration.postgres_cluster import running_postgres
from tests.integration.services_harness import ServerProcess

TIME = "2026-01-02T03:04:05.123456Z"


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture
def storage(postgres_url: str) -> Iterator[Storage]:
    store = Storage(postgres_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE nodes, reports, pipelines")
    try:
        yield store
    finally:
        store.close()


def report(run: str, node: str, result: int = 1) -> dict[str, object]:
    task = {
        "status": "succeeded", "attempts": 1, "started_at": TIME, "finished_at": TIME,
        "duration_s": 0.1, "result": result, "error": None,
    }  # fmt: skip
    return {
        "run_id": run, "node_id": node, "pipeline": "p", "status": "succeeded",
        "started_at": TIME, "finished_at": TIME, "tasks": {"b": task, "a": task}, "log": "l\n",
    }  # fmt: skip


def test_storage_on_postgresql(storage: Storage) -> None:
    now = time.time()
    beat = HeartbeatRow("n1", "r1", 5, "running", 1, 2, 10.0, TIME, now)
    storage.record_heartbeats([beat, HeartbeatRow("n2", "r9", 1, "done", 2, 2, 10.0, TIME, now)])
    storage.record_heartbeats([HeartbeatRow("n1", "r1", 4, "starting", 0, 2, 10.0, TIME, now)])
    nodes = {n["node_id"]: n for n in storage.nodes()}
    assert nodes["n1"]["state"] == "running", "a late lower seq does not move the node back"
    assert nodes["n2"]["alive"] is True

    assert storage.put_report(report("r1", "n1")) == "created"
    assert storage.put_report(dict(reversed(list(report("r1", "n1").items())))) == "unchanged"
    assert storage.put_report(report("r1", "n1", result=2)) == "conflict"
    stored = storage.get_report("r1")
    assert stored == report("r1", "n1") and list(stored["tasks"]) == ["b", "a"]
    assert [r["run_id"] for r in storage.runs(10)] == ["r1"]

    sha = storage.put_pipeline("etl", b"\x1f\x8b\x00 bytes")
    assert storage.get_pipeline("etl") == (b"\x1f\x8b\x00 bytes", sha)
    assert storage.put_pipeline("etl", b"\x1f\x8b new") != sha


def test_two_replicas_share_one_postgresql(
    postgres_url: str, storage: Storage, tmp_path: Path
) -> None:
    replicas = [ServerProcess(tmp_path / name) for name in ("a", "b")]
    for replica in replicas:
        replica.workdir.mkdir()
        replica.secret_file.write_text("shared-secret\n")
        replica.admin_token_file.write_text("shared-admin\n")
        replica.extra_args = ("--db", postgres_url)
    try:
        a, b = (replica.start() for replica in replicas)
        node = {"Authorization": f"Bearer {a.node_token('n1')}"}
        admin = {"Authorization": "Bearer shared-admin"}
        url = "/v1/runs/r1/report"
        assert httpx.put(a.url + url, json=report("r1", "n1"), headers=node).status_code == 201
        assert httpx.put(b.url + url, json=report("r1", "n1"), headers=node).status_code == 200
        r = httpx.put(b.url + url, json=report("r1", "n1", 2), headers=node)
        assert r.status_code == 409
        beat = {
            "run_id": "r1", "seq": 1, "state": "running", "tasks_done": 0, "tasks_total": 2,
            "interval_s": 10, "sent_at": TIME,
        }  # fmt: skip
        assert httpx.post(b.url + "/v1/nodes/n1/heartbeats", json=beat, headers=node).is_success
        nodes = httpx.get(a.url + "/v1/nodes", headers=admin).json()
        assert [(n["node_id"], n["alive"]) for n in nodes] == [("n1", True)]
        assert httpx.get(a.url + "/v1/runs/r1", headers=admin).json() == report("r1", "n1")
    finally:
        for replica in replicas:
            replica.stop()
