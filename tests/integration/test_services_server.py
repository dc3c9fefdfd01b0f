"""`imagefactory serve` as a real uvicorn subprocess over a real SQLite file, and the admin
commands against it."""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from executor.pack import pack
from tests.integration.services_harness import BIN, ServerProcess, write_pipeline

TIME = "2026-01-02T03:04:05.123456Z"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, extra_args=("--max-body-bytes", "65536"))
    try:
        yield proc.start()
    finally:
        proc.stop()


def beat(run: str = "run-1", seq: int = 1) -> dict[str, Any]:
    return {
        "run_id": run, "seq": seq, "state": "running", "tasks_done": 0, "tasks_total": 2,
        "interval_s": 5, "sent_at": TIME,
    }  # fmt: skip


def report(run: str, node: str) -> dict[str, Any]:
    task = {
        "status": "failed", "attempts": 2, "started_at": TIME, "finished_at": TIME,
        "duration_s": 0.25, "result": None,
        "error": {"type": "ValueError", "message": "bad row 7", "traceback": "Traceback..."},
    }  # fmt: skip
    return {
        "run_id": run, "node_id": node, "pipeline": "etl-demo", "status": "failed",
        "started_at": TIME, "finished_at": TIME, "tasks": {"transform": task},
        "log": f"{TIME} task:transform err boom\n{TIME} executor log run failed\n",
    }  # fmt: skip


def admin(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "imagefactory"), *args, "--url", server.url]
    argv += ["--admin-token-file", str(server.admin_token_file)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_serve_announces_its_url_and_creates_secrets(server: ServerProcess) -> None:
    assert server.url.startswith("http://127.0.0.1:") and server.port > 0
    assert len(server.admin_token) == 64
    assert server.secret_file.stat().st_mode & 0o777 == 0o600
    doc = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/runs/{run_id}/report" in doc["paths"]


def test_rejected_requests_leave_the_database_unchanged(server: ServerProcess) -> None:
    node_b = f"{server.url}/v1/nodes/node-b/heartbeats"
    good = {"Authorization": f"Bearer {server.node_token('node-b')}"}
    assert httpx.post(node_b, json=beat(), headers=good).status_code == 204
    before = server.dump()
    assert len(before) == 1

    wrong = {"Authorization": f"Bearer {server.node_token('node-a')}"}
    r = httpx.post(node_b, json=beat(seq=2), headers=wrong)
    assert r.status_code == 401 and "invalid token" in r.json()["error"]

    r = httpx.post(
        node_b, content=b"{not json", headers={**good, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]

    r = httpx.put(
        f"{server.url}/v1/runs/run-1/report",
        json={**report("run-1", "node-b"), "log": "x" * 70000},
        headers=good,
    )
    assert r.status_code == 413 and "exceeds 65536" in r.json()["error"]
    assert server.dump() == before


def test_oversize_content_length_is_answered_before_the_body(server: ServerProcess) -> None:
    """The server answers 413 from the headers alone: the body is never sent here."""
    host, port = "127.0.0.1", server.port
    head = (
        f"PUT /v1/runs/run-1/report HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {server.node_token('node-a')}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
    )
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(head.encode())
        received = b""
        while chunk := sock.recv(65536):  # the server closes the connection after a 413
            received += chunk
    answer = received.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '{"error":"request body exceeds 65536 bytes"}' in answer
    assert server.dump() == []


def test_a_client_that_waits_before_its_body_gets_the_413_not_a_100_continue(
    server: ServerProcess,
) -> None:
    """`Expect: 100-continue` (curl, for large bodies): the body is not asked for."""
    head = (
        f"PUT /v1/runs/run-1/report HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {server.node_token('node-a')}\r\n"
        "Content-Type: application/json\r\nContent-Length: 5000000\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.decode().startswith("HTTP/1.1 413"), received[:200]


def test_admin_commands_against_a_real_server(server: ServerProcess, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {server.node_token('node-a')}"}
    httpx.post(f"{server.url}/v1/nodes/node-a/heartbeats", json=beat(), headers=headers)
    r = httpx.put(
        f"{server.url}/v1/runs/run-1/report", json=report("run-1", "node-a"), headers=headers
    )
    assert r.status_code == 201

    nodes = admin(server, "nodes")
    assert nodes.returncode == 0, nodes.stderr
    header, row = nodes.stdout.splitlines()
    assert header.split() == ["NODE_ID", "RUN_ID", "STATE", "PROGRESS", "LAST_SEEN", "ALIVE"]
    assert row.split()[:4] == ["node-a", "run-1", "running", "0/2"] and row.endswith("yes")
    assert json.loads(admin(server, "nodes", "--json").stdout)[0]["alive"] is True

    runs = json.loads(admin(server, "runs", "--json").stdout)
    assert [(r["run_id"], r["status"]) for r in runs] == [("run-1", "failed")]
    shown = admin(server, "report", "run-1").stdout
    assert "status failed" in shown and "ValueError: bad row 7" in shown
    assert "log" not in json.loads(admin(server, "report", "run-1", "--json").stdout)
    assert admin(server, "logs", "run-1").stdout == report("run-1", "node-a")["log"]

    archive = tmp_path / "etl.tar.gz"
    pack(write_pipeline(tmp_path / "etl"), archive)
    published = json.loads(admin(server, "publish", "etl", str(archive), "--json").stdout)
    download = httpx.get(
        f"{server.url}/v1/pipelines/etl", headers={**headers, "X-Node-ID": "node-a"}
    )
    assert download.content == archive.read_bytes()
    assert download.headers["X-Pipeline-SHA256"] == published["sha256"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("report", "nope"), "404 no report for run nope"),
        (("logs", "bad id!"), "Invalid value for 'RUN_ID'"),
        (("report", "../x"), "Invalid value for 'RUN_ID'"),
        (("runs", "--node", "a/b"), "Invalid value for '--node'"),
        (("publish", "etl", "/nonexistent.tar.gz"), "does not exist"),
    ],
)
def test_admin_command_errors_end_in_one_error_line(
    server: ServerProcess, args: tuple[str, ...], message: str
) -> None:
    result = admin(server, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last


def test_token_refuses_a_node_id_the_server_would_refuse(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    argv = [str(BIN / "imagefactory"), "token", "../x", "--secret-file", str(secret)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Invalid value for 'NODE_ID'" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (gzip.compress(b"not a tar"), "not a valid .tar.gz archive"),
        (b"plain text", "not a valid .tar.gz archive"),
    ],
)
def test_publish_refuses_what_validate_refuses(
    server: ServerProcess, tmp_path: Path, content: bytes, message: str
) -> None:
    archive = tmp_path / "bad.tar.gz"
    archive.write_bytes(content)
    result = admin(server, "publish", "etl", str(archive))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("Error: not published: ") and message in result.stderr
    assert server.rows("pipelines") == []


def test_publish_refuses_a_pipeline_whose_module_breaks(
    server: ServerProcess, tmp_path: Path
) -> None:
    source = write_pipeline(tmp_path / "p")
    (source / "h3tasks.py").write_text("import os\nos._exit(7)\n")
    archive = tmp_path / "p.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(source.iterdir()):
            tar.add(path, arcname=path.name)
    result = admin(server, "publish", "etl", str(archive))
    assert result.returncode == 2 and "exit code 7" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert server.rows("pipelines") == []


def test_admin_command_with_a_node_token_is_refused(server: ServerProcess, tmp_path: Path) -> None:
    token_file = tmp_path / "node-token"
    token_file.write_text(server.node_token("node-a"))
    argv = [
        str(BIN / "imagefactory"),
        "runs",
        "--url",
        server.url,
        "--admin-token-file",
        str(token_file),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "401 invalid admin token" in result.stderr


def test_admin_command_without_a_server(tmp_path: Path) -> None:
    token_file = tmp_path / "admin"
    token_file.write_text("x")
    argv = [
        str(BIN / "imagefactory"),
        "nodes",
        "--url",
        "http://127.0.0.1:9",
        "--admin-token-file",
        str(token_file),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot reach core services" in result.stderr


def test_token_command_matches_the_server(server: ServerProcess) -> None:
    argv = [str(BIN / "imagefactory"), "token", "node-7", "--secret-file", str(server.secret_file)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == server.node_token("node-7")
    r = httpx.post(
        f"{server.url}/v1/nodes/node-7/heartbeats",
        json=beat(),
        headers={"Authorization": f"Bearer {result.stdout.strip()}"},
    )
    assert r.status_code == 204


def test_serve_refuses_a_port_in_use(server: ServerProcess, tmp_path: Path) -> None:
    second = ServerProcess(tmp_path / "second", port=server.port)
    second.workdir.mkdir()
    with pytest.raises(AssertionError, match="Address already in use"):
        second.start()
