"""What TLS costs a node: heartbeats sent the way the agent sends them (executor's
`Master.request`: urllib, a new connection per request, so every heartbeat pays a full TCP
and TLS handshake with certificate and host name verification) to two `imagefactory serve`
processes on loopback, one plain HTTP and one HTTPS with a certificate from a CA made
here. Rounds alternate between the two so that host load hits both alike; prints the
median and p90 latency of each and the ratio https/http.

    .venv/bin/python benchmarks/tls.py                   # 10 rounds x 50 heartbeats each
    .venv/bin/python benchmarks/tls.py --rounds 20 --per-round 100 --json out.json

No goal from the issue; the figure shows whether TLS by default is affordable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from executor.agent.heartbeat import Heartbeats
from executor.agent.master import Master
from imagefactory import pki
from imagefactory.tokens import node_token

BIN = Path(sys.executable).parent


def serve(work: Path, name: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """An `imagefactory serve` of its own database; (process, URL it listens on)."""
    (work / name).mkdir()
    argv = [
        str(BIN / "imagefactory"), "serve", "--port", "0", "--db", str(work / name / "db"),
        "--secret-file", str(work / "secret"), "--admin-token-file", str(work / "admin"), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if b"listening on " in line:
            return proc, line.decode().split("listening on ", 1)[1].strip()
    raise SystemExit(f"{name}: serve did not start")


def beats(master: Master, count: int, agent: Heartbeats) -> list[float]:
    """Latencies (ms) of `count` heartbeats (the agent's bodies), one connection each."""
    out = []
    for _ in range(count):
        body = json.dumps(agent.body()).encode()
        started = time.perf_counter()
        master.request("POST", f"/v1/nodes/{master.node_id}/heartbeats", body)
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "secret").write_text("bench-secret\n")
        pki.create_ca(work / "ca")
        cert = pki.issue(work / "ca", "master", ("127.0.0.1",))
        plain_proc, plain_url = serve(work, "plain")
        tls_proc, tls_url = serve(
            work, "tls", "--tls-cert", str(cert.cert), "--tls-key", str(cert.key)
        )
        try:
            token = node_token("bench-secret", "bench")
            ca = (work / "ca" / "bundle.crt").read_text()
            peers = {
                "http": Master(plain_url, token, "bench"),
                "https": Master(tls_url, token, "bench", ca_pem=ca),
            }
            latencies: dict[str, list[float]] = {name: [] for name in peers}
            agents = {name: Heartbeats(master, "bench-run", 10.0) for name, master in peers.items()}
            for name, master in peers.items():  # warm-up, not counted
                beats(master, 5, agents[name])
            for _ in range(args.rounds):
                for name, master in peers.items():
                    latencies[name] += beats(master, args.per_round, agents[name])
        finally:
            for proc in (plain_proc, tls_proc):
                proc.terminate()
                proc.wait(timeout=30)
                if proc.stdout is not None:
                    proc.stdout.close()
    figures: dict[str, dict[str, float]] = {}
    for name, values in latencies.items():
        p50 = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        figures[name] = {"n": len(values), "p50_ms": round(p50, 2), "p90_ms": round(p90, 2)}
        print(f"{name:<6} n={len(values)}  p50 {p50:.2f} ms  p90 {p90:.2f} ms")
    ratio = figures["https"]["p50_ms"] / figures["http"]["p50_ms"]
    figures["ratio_https_http_p50"] = {"value": round(ratio, 2)}
    print(f"ratio https/http p50 x{ratio:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
