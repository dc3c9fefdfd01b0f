"""Spool, delivery, heartbeats and gateway download against a scripted HTTP server on
loopback (real sockets and urllib; only the server's answers are scripted)."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from tenacity import RetryCallState, Retrying

from executor.agent.config import load_config
from executor.agent.delivery import Deliverer, Spool, Undelivered
from executor.agent.gateway import (
    NotDownloaded,
    Sha256Mismatch,
    download,
    obtain_pipeline,
    sha256_of,
)
from executor.agent.heartbeat import Heartbeats
from executor.agent.master import Master, Refused, Transient, backoff
from executor.pipeline import PipelineError

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Scripted:
    """Answers each request with the next scripted reply (the last one repeats)."""

    url: str = ""
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def next_reply(self) -> Reply:
        return self.replies.popleft() if len(self.replies) > 1 else self.replies[0]


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    state = Scripted()

    class Handler(BaseHTTPRequestHandler):
        def handle_one(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            headers = {k.lower(): v for k, v in self.headers.items()}
            state.requests.append((self.command, self.path, headers, body))
            status, headers, payload = state.next_reply()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = handle_one

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def master(url: str) -> Master:
    return Master(url, "tok", "node-a", timeout_s=5)


def report(run_id: str = "run-1") -> dict[str, object]:
    return {"run_id": run_id, "node_id": "node-a", "status": "failed", "tasks": {}, "log": "x"}


def test_spool_save_pending_acknowledge(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.pending() == [] and spool.status_of("run-1") is None
    path = spool.save(report())
    assert spool.pending() == [path] and spool.status_of("run-1") == "failed"
    assert not list(tmp_path.glob("spool/.*")), "no temporary file left behind"
    spool.acknowledge(path, 201)
    assert spool.pending() == [] and not path.exists()
    assert spool.status_of("run-1") == "failed" and spool.is_delivered("run-1")
    receipt = json.loads((tmp_path / "delivered" / "run-1.json").read_text())
    assert receipt["http_status"] == 201 and receipt["acknowledged_at"].endswith("Z")


def test_spooled_reports_are_private_utf8_json_whatever_the_strings(tmp_path: Path) -> None:
    """Lone surrogates (a task's result, a log line) cannot crash spooling."""
    path = Spool(tmp_path).save({**report(), "result": "bad \ud800 end", "log": "x\udcff\n"})
    saved = json.loads(path.read_bytes().decode("utf-8"))  # strict UTF-8
    assert saved["result"] == "bad \ufffd end" and saved["log"] == "x\ufffd\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_delivery_retries_transient_failures_and_sends_the_same_bytes(
    scripted: Scripted, tmp_path: Path
) -> None:
    scripted.script((503, {}, b'{"error":"busy"}'), (429, {}, b""), (201, {}, b"{}"))
    spool = Spool(tmp_path)
    path = spool.save(report())
    body = path.read_bytes()
    assert Deliverer(master(scripted.url), spool).deliver(path) == 201
    assert [r[:2] for r in scripted.requests] == [("PUT", "/v1/runs/run-1/report")] * 3
    assert {r[3] for r in scripted.requests} == {body}
    assert scripted.requests[0][2]["authorization"] == "Bearer tok"
    assert spool.pending() == [] and spool.is_delivered("run-1")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413])
def test_refused_report_is_kept(scripted: Scripted, tmp_path: Path, status: int) -> None:
    scripted.script((status, {}, b'{"error":"no"}'))
    spool = Spool(tmp_path)
    path = spool.save(report())
    with pytest.raises(Refused, match=f"{status} no") as refused:
        Deliverer(master(scripted.url), spool).deliver(path)
    assert refused.value.status == status
    assert len(scripted.requests) == 1, "a refusal is not retried"
    assert spool.pending() == [path] and not spool.is_delivered("run-1")


def test_undeliverable_report_is_kept_after_the_deadline(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    path = spool.save(report())
    with pytest.raises(Undelivered, match="not delivered after"):
        Deliverer(master("http://127.0.0.1:9"), spool).deliver(path, give_up_after_s=1)
    assert spool.pending() == [path]


@pytest.mark.parametrize("since_start_s", [0.5, 29.0, 29.9, 31.0])
def test_no_backoff_waits_past_the_give_up_time(since_start_s: float) -> None:
    """The last attempt is made at the deadline, not up to a 60 s backoff after it."""
    state = RetryCallState(Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = 30  # the uncapped backoff is anything up to 60 s by now
    state.outcome_timestamp = state.start_time + since_start_s
    waits = [backoff(30.0)(state) for _ in range(50)]
    assert all(0.0 <= wait <= max(0.0, 30.0 - since_start_s) + 1e-6 for wait in waits), waits
    assert max(backoff()(state) for _ in range(50)) > 1.0, "without a deadline: uncapped"


def test_unreachable_master_is_transient() -> None:
    with pytest.raises(Transient, match="GET /x"):
        master("http://127.0.0.1:9").request("GET", "/x")


def test_heartbeat_body_and_jitter(scripted: Scripted) -> None:
    beats = Heartbeats(master(scripted.url), "run-1", interval_s=10)
    beats.update(state="running", done=2, total=5)
    first, second = beats.body(), beats.body()
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["state"] == "running" and (first["tasks_done"], first["tasks_total"]) == (2, 5)
    assert first["interval_s"] == 10 and len(first["sent_at"]) == 27
    delays = [beats.next_delay() for _ in range(500)]
    assert 8 <= min(delays) < 9 and 11 < max(delays) <= 12


def test_heartbeat_thread_retries_and_sends_a_last_beat(scripted: Scripted) -> None:
    scripted.script((503, {}, b""), (204, {}, b""))
    beats = Heartbeats(master(scripted.url), "run-1", interval_s=0.05)
    beats.start()
    _wait_until(lambda: beats.sent >= 3)
    beats.stop(final_state="done")
    posted = [json.loads(r[3]) for r in scripted.requests]
    assert {r[1] for r in scripted.requests} == {"/v1/nodes/node-a/heartbeats"}
    assert posted[-1]["state"] == "done"
    assert [p["seq"] for p in posted] == sorted(p["seq"] for p in posted)


def test_a_state_change_is_sent_at_once_not_at_the_next_interval(scripted: Scripted) -> None:
    scripted.script((204, {}, b""))
    beats = Heartbeats(master(scripted.url), "run-1", interval_s=600)
    beats.start()
    try:
        _wait_until(lambda: beats.sent == 1)
        beats.update(done=1)  # progress alone waits for the next interval
        beats.update(state="running")
        _wait_until(lambda: beats.sent == 2)
        beats.update(state="running", done=2)
        threading.Event().wait(0.2)
        assert beats.sent == 2
    finally:
        beats.stop()
    posted = [json.loads(r[3]) for r in scripted.requests]
    assert [(p["state"], p["tasks_done"]) for p in posted] == [("starting", 0), ("running", 1)]


def _wait_until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        threading.Event().wait(0.01)


def test_gateway_download_checks_the_announced_sha(scripted: Scripted, tmp_path: Path) -> None:
    data = b"\x1f\x8b pipeline bytes"
    good = hashlib.sha256(data).hexdigest()
    scripted.script(
        (200, {"X-Pipeline-SHA256": "0" * 64}, data),  # a broken transfer: retried
        (200, {"X-Pipeline-SHA256": good}, data),
    )
    target = download(master(scripted.url), "etl", tmp_path / "etl.tar.gz", 1 << 20)
    assert target.read_bytes() == data and len(scripted.requests) == 2
    assert scripted.requests[0][2]["x-node-id"] == "node-a"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["etl.tar.gz"]  # no partial file left


def test_a_lasting_sha_mismatch_is_given_up_at_the_poweroff_grace_period(
    scripted: Scripted, tmp_path: Path
) -> None:
    scripted.script((200, {"X-Pipeline-SHA256": "0" * 64}, b"never the announced bytes"))
    config = load_config(
        {
            "EXECUTOR_PIPELINE": "gateway:etl",
            "EXECUTOR_MASTER_URL": scripted.url,
            "EXECUTOR_TOKEN": "tok",
            "EXECUTOR_STATE_DIR": str(tmp_path / "s"),
            "EXECUTOR_ON_COMPLETE": "poweroff",
            "EXECUTOR_POWEROFF_GRACE_S": "0.5",
        }
    )
    started = time.monotonic()
    with pytest.raises(NotDownloaded, match=r"^pipeline etl not downloaded within EXECUTOR_PO"):
        obtain_pipeline(config, master(scripted.url))
    assert time.monotonic() - started < 30 and len(scripted.requests) >= 2
    assert not list((tmp_path / "s").glob("runs/*/etl.tar.gz")), "no unchecked download kept"


def test_gateway_download_over_the_limit_is_refused_and_leaves_nothing(
    scripted: Scripted, tmp_path: Path
) -> None:
    data = b"x" * 5000
    scripted.script((200, {"X-Pipeline-SHA256": hashlib.sha256(data).hexdigest()}, data))
    with pytest.raises(PipelineError, match="gateway:etl: .*over 4096.*MAX_DOWNLOAD_BYTES"):
        download(master(scripted.url), "etl", tmp_path / "etl.tar.gz", 4096)
    assert list(tmp_path.iterdir()) == [] and len(scripted.requests) == 1  # not retried


def test_gateway_refusal(scripted: Scripted, tmp_path: Path) -> None:
    scripted.script((404, {}, b'{"error":"no pipeline named etl"}'))
    with pytest.raises(Refused, match="404 no pipeline named etl"):
        download(master(scripted.url), "etl", tmp_path / "etl.tar.gz", 1 << 20)


def test_local_archive_sha256(tmp_path: Path) -> None:
    archive = tmp_path / "p.tar.gz"
    archive.write_bytes(b"archive")
    env = {"EXECUTOR_PIPELINE": str(archive), "EXECUTOR_STATE_DIR": str(tmp_path / "s")}
    ok = load_config({**env, "EXECUTOR_PIPELINE_SHA256": sha256_of(archive)})
    assert obtain_pipeline(ok, None) == archive
    bad = load_config({**env, "EXECUTOR_PIPELINE_SHA256": "1" * 64})
    with pytest.raises(Sha256Mismatch, match="expects 1111"):
        obtain_pipeline(bad, None)
    missing = load_config({**env, "EXECUTOR_PIPELINE": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        obtain_pipeline(missing, None)


def test_report_log_is_cut_in_the_middle_when_too_large(tmp_path: Path) -> None:
    from executor.agent.reportlog import log_for_report

    log = tmp_path / "combined.log"
    lines = [f"2026-01-01T00:00:00.000000Z task:a out line {i:05d}\n" for i in range(2000)]
    log.write_text("".join(lines))
    assert log_for_report(log, limit=10**6) == "".join(lines)
    cut = log_for_report(log, limit=20000)
    assert len(cut.encode()) <= 20000 + 200
    assert cut.startswith(lines[0]) and cut.endswith(lines[-1])
    kept = cut.splitlines(keepends=True)
    marker = [line for line in kept if "left out of this report" in line]
    assert len(marker) == 1 and str(log) in marker[0]
    assert all(line in lines for line in kept if line not in marker), "only whole lines"


def test_requests_ignore_proxy_settings(
    scripted: Scripted, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    scripted.script((204, {}, b""))
    assert master(scripted.url).request("POST", "/v1/nodes/node-a/heartbeats", b"{}").status == 204
