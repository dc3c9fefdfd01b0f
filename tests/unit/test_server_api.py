"""The v1 API in process (Starlette TestClient) over a real SQLite file."""

from __future__ import annotations

import copy
import gzip
import json
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagefactory.server.app import create_app
from imagefactory.server.config import ServerConfig, database_url
from imagefactory.tokens import node_token

SECRET = "fleet-secret"
ADMIN = "admin-token"
TIME = "2026-01-02T03:04:05.123456Z"


def auth(token: str, node: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if node is not None:
        headers["X-Node-ID"] = node
    return headers


def node_auth(node: str) -> dict[str, str]:
    return auth(node_token(SECRET, node))


def beat(run: str = "run-1", seq: int = 1, **changes: Any) -> dict[str, Any]:
    body = {
        "run_id": run,
        "seq": seq,
        "state": "running",
        "tasks_done": 1,
        "tasks_total": 3,
        "interval_s": 10,
        "sent_at": TIME,
    }
    return {**body, **changes}


def report(run: str = "run-1", node: str = "node-a") -> dict[str, Any]:
    return {
        "run_id": run,
        "node_id": node,
        "pipeline": "etl-demo",
        "status": "succeeded",
        "started_at": TIME,
        "finished_at": TIME,
        "tasks": {
            "extract": {
                "status": "succeeded",
                "attempts": 1,
                "started_at": TIME,
                "finished_at": TIME,
                "duration_s": 0.5,
                "result": [1, 2, 3],
                "error": None,
            }
        },
        "log_path": "/var/lib/executor/runs/run-1/combined.log",
        "log": f"{TIME} executor log run started\n",
    }


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "services.db"


@pytest.fixture
def client(db: Path) -> Iterator[TestClient]:
    config = ServerConfig(
        db_url=database_url(str(db)), secret=SECRET, admin_token=ADMIN, max_body_bytes=4096
    )
    with TestClient(create_app(config)) as test_client:
        yield test_client


def dump_db(db: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return [
            row
            for table in ("nodes", "reports", "pipelines")
            for row in conn.execute(f"SELECT '{table}', * FROM {table} ORDER BY 2")
        ]


def test_heartbeat_then_nodes_listing(client: TestClient) -> None:
    r = client.post("/v1/nodes/node-a/heartbeats", json=beat(), headers=node_auth("node-a"))
    assert r.status_code == 204
    r = client.get("/v1/nodes", headers=auth(ADMIN))
    assert r.status_code == 200
    [node] = r.json()
    assert node["node_id"] == "node-a" and node["run_id"] == "run-1"
    assert node["state"] == "running" and node["alive"] is True
    assert node["tasks_done"] == 1 and node["tasks_total"] == 3
    assert node["last_seen"].endswith("Z") and len(node["last_seen"]) == 27


def test_late_heartbeat_does_not_move_node_back(client: TestClient) -> None:
    headers = node_auth("node-a")
    client.post("/v1/nodes/node-a/heartbeats", json=beat(seq=5, state="done"), headers=headers)
    client.post("/v1/nodes/node-a/heartbeats", json=beat(seq=4), headers=headers)
    [node] = client.get("/v1/nodes", headers=auth(ADMIN)).json()
    assert node["state"] == "done"
    # A restarted agent counts from 1 again; its beats are newer, so they count.
    later = TIME.replace("03:04:05", "03:09:00")
    client.post("/v1/nodes/node-a/heartbeats", json=beat(seq=1, sent_at=later), headers=headers)
    [node] = client.get("/v1/nodes", headers=auth(ADMIN)).json()
    assert node["state"] == "running"
    client.post("/v1/nodes/node-a/heartbeats", json=beat("run-2", seq=0), headers=headers)
    [node] = client.get("/v1/nodes", headers=auth(ADMIN)).json()
    assert (node["run_id"], node["state"]) == ("run-2", "running")


def test_alive_follows_three_intervals(client: TestClient, db: Path) -> None:
    client.post(
        "/v1/nodes/node-a/heartbeats", json=beat(interval_s=100), headers=node_auth("node-a")
    )
    with sqlite3.connect(db) as conn:  # 250 s ago: younger than 3 x 100 s
        conn.execute("UPDATE nodes SET last_seen = last_seen - 250")
    assert client.get("/v1/nodes", headers=auth(ADMIN)).json()[0]["alive"] is True
    with sqlite3.connect(db) as conn:  # 350 s ago: older
        conn.execute("UPDATE nodes SET last_seen = last_seen - 100")
    assert client.get("/v1/nodes", headers=auth(ADMIN)).json()[0]["alive"] is False


def test_report_is_idempotent(client: TestClient) -> None:
    url = "/v1/runs/run-1/report"
    body = report()
    r = client.put(url, json=body, headers=node_auth("node-a"))
    assert (r.status_code, r.json()) == (201, {"run_id": "run-1", "stored": "created"})
    # The same JSON value with other key order and whitespace is a repeat: 200.
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=3)
    r = client.put(url, content=reordered, headers=node_auth("node-a"))
    assert (r.status_code, r.json()["stored"]) == (200, "unchanged")
    documented = client.get("/openapi.json").json()["paths"][url.replace("run-1", "{run_id}")]
    assert {"200", "201", "409"} <= set(documented["put"]["responses"]), "the contract says so"
    changed = copy.deepcopy(body)
    changed["tasks"]["extract"]["result"] = [1, 2, 4]
    r = client.put(url, json=changed, headers=node_auth("node-a"))
    assert r.status_code == 409 and "different report" in r.json()["error"]
    stored = client.get("/v1/runs/run-1", headers=auth(ADMIN))
    assert stored.json() == body
    assert list(stored.json()) == list(body), "the report keeps the order it was sent in"


def test_runs_listing(client: TestClient) -> None:
    client.put("/v1/runs/run-1/report", json=report(), headers=node_auth("node-a"))
    client.put("/v1/runs/run-2/report", json=report("run-2", "node-b"), headers=node_auth("node-b"))
    runs = client.get("/v1/runs", headers=auth(ADMIN)).json()
    assert [r["run_id"] for r in runs] == ["run-2", "run-1"]
    assert runs[0]["node_id"] == "node-b" and runs[0]["status"] == "succeeded"
    only_a = client.get("/v1/runs?node=node-a", headers=auth(ADMIN)).json()
    assert [r["run_id"] for r in only_a] == ["run-1"]


def test_pipeline_publish_and_download(client: TestClient) -> None:
    archive = gzip.compress(b"tar bytes")
    r = client.put("/v1/pipelines/etl-demo", content=archive, headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["size"] == len(archive)
    sha = r.json()["sha256"]
    r = client.get("/v1/pipelines/etl-demo", headers=auth(node_token(SECRET, "n1"), "n1"))
    assert r.status_code == 200
    assert r.content == archive and r.headers["X-Pipeline-SHA256"] == sha
    assert client.get("/v1/pipelines/nope", headers=auth(ADMIN)).status_code == 404


def test_openapi_document_describes_the_api(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert "/v1/nodes/{node_id}/heartbeats" in doc["paths"]
    assert "Heartbeat" in doc["components"]["schemas"]
    report_body = doc["paths"]["/v1/runs/{run_id}/report"]["put"]["requestBody"]
    assert report_body["content"]["application/json"]["schema"]["$ref"].endswith("/Report")
    assert "Report" in doc["components"]["schemas"]


def report_text(**replace: str) -> str:
    """The report as JSON text, with some values swapped for raw JSON text."""
    text = json.dumps(report())
    for old, raw in replace.items():
        text = text.replace(old, raw, 1)
    return text


REPORT_NAN = report_text(**{"[1, 2, 3]": "[1, NaN, 3]"})
REPORT_INF = report_text(**{'"duration_s": 0.5': '"duration_s": -Infinity'})
REPORT_LONE = report_text(**{"run started": "run \\ud800 started"})
REPORT_DEEP = report_text(**{"[1, 2, 3]": "[" * 1400 + "]" * 1400})
BASIC = {"Authorization": "Basic eDp5"}
REJECTIONS: list[tuple[str, str, dict[str, str], Any, int, str]] = [
    # (method, url, headers, body, status, error fragment)
    ("POST", "/v1/nodes/node-b/heartbeats", node_auth("node-a"), beat(), 401, "invalid token"),
    ("POST", "/v1/nodes/node-a/heartbeats", {}, beat(), 401, "missing bearer"),
    (
        "POST",
        "/v1/nodes/node-a/heartbeats",
        {"Authorization": "Basic eDp5"},
        beat(),
        401,
        "missing bearer",
    ),
    ("POST", "/v1/nodes/node-a/heartbeats", auth(ADMIN), beat(), 403, "admin token"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), "{", 400, "JSON"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), beat(seq=-1), 400, "seq"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), beat(state="x"), 400, "state"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), beat(sent_at="now"), 400, ""),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), beat(extra=1), 400, "extra"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), "x" * 5000, 413, "exceeds"),
    ("POST", "/v1/nodes/bad%20id/heartbeats", node_auth("bad id"), beat(), 400, "node_id"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-b"), report(), 401, "node-a"),
    ("PUT", "/v1/runs/run-1/report", auth(ADMIN), report(), 403, "admin"),
    # With X-Node-ID, a bad token is refused before the body is looked at.
    ("PUT", "/v1/runs/run-1/report", auth("bad", "node-a"), "{", 401, "invalid token"),
    (
        "PUT",
        "/v1/runs/run-1/report",
        auth(node_token(SECRET, "node-b"), "node-b"),
        report(),
        401,
        "node-a",
    ),
    ("PUT", "/v1/runs/run-2/report", node_auth("node-a"), report(), 400, "differs"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), b"\xff{garbage", 400, "JSON"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), [1], 400, "invalid"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), {**report(), "status": "ok"}, 400, ""),
    ("GET", "/v1/nodes", node_auth("node-a"), None, 401, "admin"),
    ("GET", "/v1/nodes", auth(node_token(SECRET, "node-a"), "node-a"), None, 403, "admin"),
    ("GET", "/v1/runs/run-1", auth(ADMIN), None, 404, "no report"),
    ("GET", "/v1/pipelines/etl", node_auth("node-a"), None, 401, "X-Node-ID"),
    ("GET", "/v1/pipelines/etl", auth("bad", "node-a"), None, 401, "invalid token"),
    ("PUT", "/v1/pipelines/etl", auth(node_token(SECRET, "n"), "n"), b"\x1f\x8b", 403, "admin"),
    ("PUT", "/v1/pipelines/etl", auth(ADMIN), b"not gzip", 400, "gzip"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-a"), beat(seq=2**64), 400, "seq"),
    (
        "POST",
        "/v1/nodes/node-a/heartbeats",
        node_auth("node-a"),
        beat(tasks_done=2**63),
        400,
        "tasks_done",
    ),
    # The token is checked before the body: no schema for an unauthenticated caller.
    ("POST", "/v1/nodes/node-a/heartbeats", {}, "{", 401, "missing bearer"),
    ("POST", "/v1/nodes/node-a/heartbeats", node_auth("node-b"), beat(seq=-1), 401, "invalid"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), REPORT_NAN, 400, "NaN is not a JSON"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), REPORT_INF, 400, "Infinity is not"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), REPORT_LONE, 400, "surrogates"),
    ("PUT", "/v1/runs/run-1/report", node_auth("node-a"), REPORT_DEEP, 400, "nested too deeply"),
    ("GET", "/v1/nodes", auth(ADMIN, "../x"), None, 400, "X-Node-ID: String should match"),
    ("GET", "/v1/nowhere", auth(ADMIN), None, 404, "Not Found"),
    ("DELETE", "/v1/nodes", auth(ADMIN), None, 405, "Not Allowed"),
]


@pytest.mark.parametrize(("method", "url", "headers", "body", "status", "fragment"), REJECTIONS)
def test_rejected_requests_change_nothing(
    client: TestClient,
    db: Path,
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any,
    status: int,
    fragment: str,
) -> None:
    before = dump_db(db)
    if isinstance(body, str | bytes):
        kwargs: dict[str, Any] = {"content": body}
        headers = {**headers, "Content-Type": "application/json"}
    else:
        kwargs = {} if body is None else {"json": body}
    r = client.request(method, url, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]
    assert dump_db(db) == before


def test_report_strings_with_surrogate_pairs_are_kept(client: TestClient) -> None:
    body = report_text(**{"run started": "run \\ud83d\\ude00 started"})
    r = client.put("/v1/runs/run-1/report", content=body, headers=node_auth("node-a"))
    assert r.status_code == 201, r.text
    stored = client.get("/v1/runs/run-1", headers=auth(ADMIN)).json()
    assert "run \U0001f600 started" in stored["log"]


def test_the_database_file_is_private(client: TestClient, db: Path) -> None:
    client.post("/v1/nodes/node-a/heartbeats", json=beat(), headers=node_auth("node-a"))
    for path in [db, *db.parent.glob(db.name + "-*")]:  # with the -wal and -shm files
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_chunked_body_over_the_limit_is_413(client: TestClient, db: Path) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/v1/nodes/node-a/heartbeats", content=chunks(), headers=node_auth("node-a"))
    assert r.status_code == 413
    assert dump_db(db) == []
