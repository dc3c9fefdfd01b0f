"""Heartbeat load on `imagefactory serve` over loopback.

N simulated nodes each send one heartbeat a second for D seconds (start times spread over
the first second), each over its own keep-alive connection, all from one asyncio process.
Prints the number of failed requests (not 204, or no answer), p50/p99 latency and the
achieved rate; then the same load against a floor peer on the same uvicorn stack (an
endpoint that answers 204 with no auth, validation or database), so the ratio shows what
the service itself costs.

    .venv/bin/python benchmarks/heartbeats.py            # 1,000 nodes x 30 s
    .venv/bin/python benchmarks/heartbeats.py --nodes 200 --seconds 10 --no-peer

Goal (issue 4): 0 failed and p99 < 100 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from imagefactory.tokens import node_token

BIN = Path(sys.executable).parent
FLOOR_APP = """
import socket, sys, uvicorn
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
async def beat(request):
    await request.body()
    return Response(status_code=204)
app = Starlette(routes=[Route("/v1/nodes/{node_id}/heartbeats", beat, methods=["POST"])])
sock = socket.socket(); sock.bind(("127.0.0.1", 0)); sock.listen(4096)
print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False)).run(sockets=[sock])
"""


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failed += 1
        self.errors[why] = self.errors.get(why, 0) + 1


def start(argv: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode()
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].strip()
    raise SystemExit(f"server did not start: {argv}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    if proc.stdout is not None:
        proc.stdout.close()


class Connection:
    """One node's keep-alive HTTP/1.1 connection: a minimal client, so that the load
    generator costs little next to the server it measures (it shares the 2 cores)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, token: str, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        answer = await self.reader.readuntil(b"\r\n\r\n")
        status = int(answer[9:12])
        for line in answer.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                await self.reader.readexactly(int(line.split(b":", 1)[1]))
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def node(url: str, node_id: str, token: str, start: float, beats: int, tally: Tally) -> None:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = Connection(host, int(port))
    path = f"/v1/nodes/{node_id}/heartbeats"
    for seq in range(beats):
        delay = start + seq - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        body = {
            "run_id": f"run-{node_id}", "seq": seq, "state": "running", "tasks_done": seq,
            "tasks_total": beats, "interval_s": 1.0, "sent_at": "2026-01-01T00:00:00.000000Z",
        }  # fmt: skip
        sent = time.perf_counter()
        try:
            status = await asyncio.wait_for(conn.post(path, token, json.dumps(body).encode()), 30)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            tally.fail(type(exc).__name__)
            conn.close()
            continue
        tally.latencies.append(time.perf_counter() - sent)
        if status != 204:
            tally.fail(str(status))
    conn.close()


async def load(url: str, secret: str, nodes: int, seconds: int) -> tuple[Tally, float]:
    tally = Tally()
    t0 = time.monotonic() + 1.0
    began = time.perf_counter()
    names = [f"node-{i:04d}" for i in range(nodes)]
    await asyncio.gather(
        *(
            node(url, name, node_token(secret, name), t0 + i / nodes, seconds, tally)
            for i, name in enumerate(names)
        )
    )
    return tally, time.perf_counter() - began


def summary(name: str, tally: Tally, elapsed: float) -> tuple[float, float]:
    lat = sorted(tally.latencies)
    p50 = statistics.median(lat) * 1000 if lat else float("nan")
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
    rate = (len(lat) + tally.failed) / elapsed
    print(
        f"{name:<22} requests {len(lat) + tally.failed:>6}  failed {tally.failed:>4}  "
        f"p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  max {lat[-1] * 1000 if lat else 0:7.1f} ms  "
        f"rate {rate:6.0f}/s"
    )
    if tally.errors:
        print(f"{'':<22} failures: {tally.errors}")
    return p50, p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--no-peer", action="store_true", help="skip the floor peer")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hb-bench-") as tmp:
        work = Path(tmp)
        (work / "secret").write_text("benchmark-secret\n")
        serve = [
            str(BIN / "imagefactory"), "serve", "--port", "0", "--db", str(work / "db.sqlite"),
            "--secret-file", str(work / "secret"), "--admin-token-file", str(work / "admin"),
        ]  # fmt: skip
        print(
            f"{args.nodes} nodes x 1 heartbeat/s x {args.seconds} s, loopback, "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} before the run"
        )
        proc, url = start(serve)
        try:
            tally, elapsed = asyncio.run(load(url, "benchmark-secret", args.nodes, args.seconds))
        finally:
            stop(proc)
        p50, p99 = summary("imagefactory serve", tally, elapsed)
        if not args.no_peer:
            peer, peer_url = start([sys.executable, "-c", FLOOR_APP])
            try:
                floor, floor_elapsed = asyncio.run(load(peer_url, "x", args.nodes, args.seconds))
            finally:
                stop(peer)
            f50, f99 = summary("floor (uvicorn 204)", floor, floor_elapsed)
            print(f"{'ratio serve/floor':<22} p50 x{p50 / f50:.2f}  p99 x{p99 / f99:.2f}")
    goal = tally.failed == 0 and p99 < 100
    print(f"goal (0 failed, p99 < 100 ms): {'met' if goal else 'NOT met'}")
    return 0 if goal else 1


if __name__ == "__main__":
    sys.exit(main())
