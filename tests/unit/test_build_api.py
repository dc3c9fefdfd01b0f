"""The build service API in process (Starlette TestClient) over a real SQLite file and a real
environment store: submit, claim, lease, uploads, finish, downloads, prune, bad input."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from imagefactory.server.app import create_app
from imagefactory.server.buildqueue import BuildQueue
from imagefactory.server.config import ServerConfig, database_url
from imagefactory.tokens import builder_token, node_token

SECRET = "fleet-secret"
ADMIN = {"Authorization": "Bearer admin-token"}


def builder(builder_id: str = "b1") -> dict[str, str]:
    return {
        "Authorization": f"Bearer {builder_token(SECRET, builder_id)}",
        "X-Builder-ID": builder_id,
    }


def pipeline_archive(name: str = "demo") -> bytes:
    spec = f'{{"format": 1, "name": "{name}", "tasks": []}}'.encode()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("pipeline.json")
        info.size = len(spec)
        tar.addfile(info, io.BytesIO(spec))
    return gzip.compress(raw.getvalue(), mtime=0)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def client(tmp_path: Path, store: Path) -> Iterator[TestClient]:
    config = ServerConfig(
        db_url=database_url(str(tmp_path / "services.db")),
        secret=SECRET,
        admin_token="admin-token",
        max_body_bytes=1 << 20,
        store_dir=store,
        formats=("qcow2", "raw"),
        lease_s=2.0,
        max_attempts=2,
    )
    with TestClient(create_app(config)) as test_client:
        yield test_client


def publish(client: TestClient, name: str = "demo") -> str:
    r = client.put(f"/v1/pipelines/{name}", content=pipeline_archive(name), headers=ADMIN)
    assert r.status_code == 200, r.text
    sha: str = r.json()["sha256"]
    return sha


def submit(client: TestClient, pipeline: str = "demo", **changes: str) -> Any:
    body = {"target": "x86_64-linux", "format": "qcow2", "pipeline": pipeline, **changes}
    return client.post("/v1/builds", json=body, headers=ADMIN)


def claim(client: TestClient, who: str = "b1", **changes: Any) -> Any:
    body = {"targets": ["x86_64-linux"], "formats": ["qcow2"], "wait_s": 0, **changes}
    return client.post("/v1/builder/claim", json=body, headers=builder(who))


def upload(client: TestClient, build: dict[str, Any], data: bytes, who: str = "b1") -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    base = f"/v1/builder/jobs/{build['build_id']}/uploads"
    body = {"attempt": build["attempt"], "digest": digest, "size": len(data)}
    r = client.post(base, json=body, headers=builder(who))
    assert r.status_code == 200, r.text
    offset = r.json()["offset"]
    while offset < len(data):
        chunk = data[offset : offset + 1000]
        params = {"attempt": build["attempt"], "offset": offset, "size": len(data)}
        r = client.patch(f"{base}/{digest}", params=params, content=chunk, headers=builder(who))
        assert r.status_code == 200, r.text
        offset = r.json()["offset"]
    return digest


def finish(client: TestClient, build: dict[str, Any], who: str = "b1", **body: Any) -> Any:
    payload = {"attempt": build["attempt"], "state": "succeeded", **body}
    return client.post(
        f"/v1/builder/jobs/{build['build_id']}/finish", json=payload, headers=builder(who)
    )


def build_one(client: TestClient, data: bytes) -> tuple[dict[str, Any], str]:
    publish(client)
    submit(client)
    job = claim(client).json()["build"]
    digest = upload(client, job, data)
    artifact = {"name": "x86_64-linux.qcow2", "digest": digest, "size": len(data)}
    r = finish(client, job, artifacts=[artifact], stages={"bake": 1.5})
    assert r.status_code == 200, r.text
    return r.json(), digest


def test_submit_is_idempotent_and_pins_the_pipeline(client: TestClient) -> None:
    sha = publish(client)
    first = submit(client)
    assert first.status_code == 201
    build = first.json()
    assert build["state"] == "queued" and build["attempt"] == 1
    assert build["pipeline"] == "demo" and build["pipeline_sha256"] == sha
    again = submit(client, pipeline=f"demo@sha256:{sha}")
    assert again.status_code == 200 and again.json()["build_id"] == build["build_id"]
    other = submit(client, format="raw")
    assert other.status_code == 201 and other.json()["build_id"] != build["build_id"]


@pytest.mark.parametrize(
    ("changes", "status", "words"),
    [
        ({"target": "sparc"}, 400, "unknown target"),
        ({"format": "vmdk"}, 400, "unknown format"),
        ({"pipeline": "missing"}, 404, "no pipeline named missing"),
        ({"pipeline": "demo@sha256:" + "0" * 64}, 409, "has sha256"),
        ({"pipeline": "demo@md5:00"}, 400, "invalid pipeline"),
        ({"extra": "x"}, 400, "invalid extra"),
    ],
)
def test_bad_submissions(
    client: TestClient, changes: dict[str, str], status: int, words: str
) -> None:
    publish(client)
    r = submit(client, **changes)
    assert r.status_code == status and words in r.json()["error"]
    assert client.get("/v1/builds", headers=ADMIN).json() == []


def test_tokens_are_kept_apart(client: TestClient) -> None:
    publish(client)
    build_id = submit(client).json()["build_id"]
    # A builder token is not a node's, nor the admin's.
    token = builder_token(SECRET, "b1")
    r = client.post(
        "/v1/nodes/b1/heartbeats",
        json={"run_id": "r", "seq": 1, "state": "running", "tasks_done": 0, "tasks_total": 1,
              "interval_s": 5, "sent_at": "2026-01-02T03:04:05.123456Z"},
        headers={"Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert r.status_code == 401 and "error" in r.json()
    assert client.get("/v1/nodes", headers=builder()).status_code == 401
    assert client.get(f"/v1/builds/{build_id}", headers=builder()).status_code == 401
    # A node token cannot claim, nor can the admin speak for a builder.
    node = {"Authorization": f"Bearer {node_token(SECRET, 'b1')}", "X-Builder-ID": "b1"}
    body = {"targets": ["x86_64-linux"], "formats": ["qcow2"], "wait_s": 0}
    assert client.post("/v1/builder/claim", json=body, headers=node).status_code == 401
    as_admin = {**ADMIN, "X-Builder-ID": "b1"}
    assert client.post("/v1/builder/claim", json=body, headers=as_admin).status_code == 403


def test_claim_only_what_a_builder_can_build(client: TestClient) -> None:
    publish(client)
    submit(client)
    assert claim(client, formats=["raw"]).status_code == 204
    assert claim(client, targets=["aarch64-linux"]).status_code == 204
    r = claim(client)
    assert r.status_code == 200
    job = r.json()
    assert job["lease_s"] == 2.0 and job["registry"] is None
    assert job["build"]["state"] == "building" and job["build"]["builder_id"] == "b1"
    assert job["build"]["attempt"] == 1
    assert claim(client, who="b2").status_code == 204  # nothing else queued
    [b] = client.get("/v1/builders", headers=ADMIN).json()[:1]
    assert b["builder_id"] == "b1" and b["formats"] == ["qcow2"]


def test_a_builder_reads_only_the_job_it_holds(client: TestClient) -> None:
    publish(client)
    submit(client)
    build = claim(client).json()["build"]
    url = f"/v1/builder/jobs/{build['build_id']}/pipeline"
    r = client.get(url, params={"attempt": 1}, headers=builder())
    assert r.status_code == 200 and r.content == pipeline_archive()
    assert client.get(url, params={"attempt": 1}, headers=builder("b2")).status_code == 409
    assert client.get(url, params={"attempt": 2}, headers=builder()).status_code == 409


def test_heartbeat_progress_log_and_cancel(client: TestClient) -> None:
    publish(client)
    submit(client)
    build = claim(client).json()["build"]
    url = f"/v1/builder/jobs/{build['build_id']}/heartbeat"
    body = {"attempt": 1, "stage": "provision", "stages": {"base": 3.5}, "log": ["a", "b"]}
    r = client.post(url, json=body, headers=builder())
    assert r.status_code == 200 and r.json() == {"cancel": False}
    shown = client.get(f"/v1/builds/{build['build_id']}", headers=ADMIN).json()
    assert shown["stage"] == "provision" and shown["stages"] == {"base": 3.5}
    log = client.get(f"/v1/builds/{build['build_id']}/log?follow=false", headers=ADMIN)
    assert log.text == "a\nb\n"
    r = client.post(f"/v1/builds/{build['build_id']}/cancel", headers=ADMIN)
    assert r.json()["state"] == "building" and r.json()["cancel_requested"] is True
    assert client.post(url, json={"attempt": 1}, headers=builder()).json() == {"cancel": True}
    r = finish(client, build, state="cancelled", error="interrupted")
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert client.post(url, json={"attempt": 1}, headers=builder()).status_code == 409


def test_cancel_a_queued_build(client: TestClient) -> None:
    publish(client)
    build_id = submit(client).json()["build_id"]
    r = client.post(f"/v1/builds/{build_id}/cancel", headers=ADMIN)
    assert r.status_code == 200 and r.json()["state"] == "cancelled"
    assert claim(client).status_code == 204
    assert client.post(f"/v1/builds/{'f' * 32}/cancel", headers=ADMIN).status_code == 404


def test_expired_lease_requeues_then_fails(client: TestClient) -> None:
    publish(client)
    submit(client)
    first = claim(client).json()["build"]
    time.sleep(2.2)
    second = claim(client, who="b2").json()["build"]
    assert second["build_id"] == first["build_id"] and second["attempt"] == 2
    # The first builder's lease is gone: no progress, no upload, no finish.
    hb = f"/v1/builder/jobs/{first['build_id']}/heartbeat"
    assert client.post(hb, json={"attempt": 1}, headers=builder()).status_code == 409
    body = {"attempt": 1, "digest": "sha256:" + "a" * 64, "size": 1}
    r = client.post(f"/v1/builder/jobs/{first['build_id']}/uploads", json=body, headers=builder())
    assert r.status_code == 409 and "lease lost" in r.json()["error"]
    assert finish(client, first, state="failed").status_code == 409
    time.sleep(2.2)
    shown = client.get(f"/v1/builds/{first['build_id']}", headers=ADMIN).json()
    assert shown["state"] == "failed" and "2 attempts" in shown["error"]


def test_upload_finish_download_and_identical_submit(client: TestClient, store: Path) -> None:
    data = os.urandom(5000)
    build, digest = build_one(client, data)
    assert build["state"] == "succeeded" and build["stages"] == {"bake": 1.5}
    assert build["artifacts"] == [{"name": "x86_64-linux.qcow2", "digest": digest, "size": 5000}]
    blob = store / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert blob.read_bytes() == data and stat.S_IMODE(blob.stat().st_mode) == 0o400
    [env] = client.get("/v1/environments", headers=ADMIN).json()
    assert env["digest"] == digest and env["size"] == 5000 and env["target"] == "x86_64-linux"
    assert env["build_id"] == build["build_id"] and env["format"] == "qcow2"
    # Built already: the same inputs give the same build back, nothing is queued.
    again = submit(client)
    assert again.status_code == 200 and again.json()["build_id"] == build["build_id"]
    url = f"/v1/environments/{digest}"
    r = client.get(url, headers=ADMIN)
    assert r.content == data and r.headers["etag"] == f'"{digest}"'
    r = client.get(url, headers={**ADMIN, "Range": "bytes=1000-"})
    assert r.status_code == 206 and r.content == data[1000:]
    assert client.get(url, headers={**ADMIN, "If-None-Match": f'"{digest}"'}).status_code == 304
    node = {"Authorization": f"Bearer {node_token(SECRET, 'n1')}", "X-Node-ID": "n1"}
    assert client.get(url, headers=node).content == data
    assert client.get(url, headers=builder()).status_code == 401
    missing = "sha256:" + "0" * 64
    assert client.get(f"/v1/environments/{missing}", headers=ADMIN).status_code == 404


def test_uploads_resume_and_are_verified(client: TestClient) -> None:
    publish(client)
    submit(client)
    build = claim(client).json()["build"]
    data = os.urandom(3000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    base = f"/v1/builder/jobs/{build['build_id']}/uploads"
    body = {"attempt": 1, "digest": digest, "size": 3000}
    client.post(base, json=body, headers=builder())
    params = {"attempt": 1, "offset": 0, "size": 3000}
    r = client.patch(f"{base}/{digest}", params=params, content=data[:1000], headers=builder())
    assert r.json()["offset"] == 1000 and r.json()["complete"] is False
    # A resumed upload asks where it stands; a chunk at another offset is refused.
    assert client.post(base, json=body, headers=builder()).json()["offset"] == 1000
    r = client.patch(f"{base}/{digest}", params=params, content=data[:1000], headers=builder())
    assert r.status_code == 409 and r.json()["offset"] == 1000
    # Data that does not match its digest is refused and dropped.
    params = {"attempt": 1, "offset": 1000, "size": 3000}
    bad = client.patch(f"{base}/{digest}", params=params, content=b"x" * 2000, headers=builder())
    assert bad.status_code == 400 and "digest" in bad.json()["error"]
    assert client.post(base, json=body, headers=builder()).json()["offset"] == 0
    # Claiming success for an artifact never uploaded is refused.
    artifact = {"name": "x86_64-linux.qcow2", "digest": digest, "size": 3000}
    r = finish(client, build, artifacts=[artifact])
    assert r.status_code == 400 and "not uploaded" in r.json()["error"]
    assert finish(client, build, artifacts=[]).status_code == 400


def test_prune_keeps_what_is_referenced(client: TestClient, store: Path) -> None:
    data = os.urandom(2000)
    _, digest = build_one(client, data)
    # A second build that fails after uploading: its blob is referenced by nothing.
    publish(client, "other")
    submit(client, pipeline="other")
    job = claim(client).json()["build"]
    stray = upload(client, job, os.urandom(100))
    assert finish(client, job, state="failed", error="boom").status_code == 200
    r = client.post("/v1/environments/prune", headers=ADMIN)
    assert r.status_code == 200
    removed = r.json()["removed"]
    assert stray in removed and digest not in removed
    assert r.json()["freed_bytes"] >= 100
    assert client.get(f"/v1/environments/{digest}", headers=ADMIN).content == data
    assert client.post("/v1/environments/prune", headers=ADMIN).json()["removed"] == []


def test_a_build_finishing_while_prune_reads_keeps_its_artifact(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder's finish lands between prune's reads of what is referenced (after the
    environments, before the uploads of builds in progress): the artifact must survive,
    because finish waits for prune."""
    publish(client)
    submit(client)
    job = claim(client).json()["build"]
    data = os.urandom(3000)
    digest = upload(client, job, data)
    artifact = {"name": "x86_64-linux.qcow2", "digest": digest, "size": len(data)}
    finished: list[Any] = []
    builder_finish = threading.Thread(
        target=lambda: finished.append(finish(client, job, artifacts=[artifact]))
    )
    read = BuildQueue.referenced

    def finish_after_the_first_read(queue: BuildQueue) -> set[str]:
        connect = queue.engine.connect

        @contextmanager
        def connection() -> Iterator[Any]:
            with connect() as conn:
                execute = conn.execute

                def execute_then_finish(*args: Any, **kwargs: Any) -> Any:
                    result = execute(*args, **kwargs)
                    if not builder_finish.is_alive() and not finished:
                        builder_finish.start()
                        builder_finish.join(1.0)  # done by now unless it waits for prune
                    return result

                conn.execute = execute_then_finish  # type: ignore[method-assign]
                yield conn

        monkeypatch.setattr(queue.engine, "connect", connection)
        try:
            return read(queue)
        finally:
            monkeypatch.setattr(queue.engine, "connect", connect)

    monkeypatch.setattr(BuildQueue, "referenced", finish_after_the_first_read)
    assert client.post("/v1/environments/prune", headers=ADMIN).status_code == 200
    builder_finish.join(30)
    assert finished[0].status_code == 200, finished[0].text
    assert client.get(f"/v1/environments/{digest}", headers=ADMIN).content == data


@pytest.mark.parametrize(
    "path",
    [
        "/v1/builds",
        "/v1/builder/claim",
        f"/v1/builder/jobs/{'0' * 32}/heartbeat",
        f"/v1/builder/jobs/{'0' * 32}/uploads",
        f"/v1/builder/jobs/{'0' * 32}/finish",
    ],
)
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": f"Bearer {node_token(SECRET, 'b1')}", "X-Builder-ID": "b1"}]
)
def test_the_token_is_checked_before_the_body(
    client: TestClient, path: str, headers: dict[str, str]
) -> None:
    """A caller without the right token learns nothing about the schema (http-api.md)."""
    r = client.post(path, json={"nonsense": [1, 2]}, headers=headers)
    assert r.status_code == 401, r.text
    assert "nonsense" not in r.text and "field" not in r.text.lower()
