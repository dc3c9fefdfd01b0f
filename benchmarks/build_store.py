"""Moving environments in and out of the store, against the plain tools on the same disk.

A real `imagefactory serve` on loopback (SQLite, temporary directory). Each round:

    upload   the builder's resumable upload (8 MiB chunks, sha256 verified by the master
             once the last byte is in) of a fresh random file of --mib MiB
    copy     the peer: copying the same file on the same disk (read, write, fsync)
    pull     `imagefactory environments pull DIGEST -o DIR` (streamed, fsynced, sha256
             checked, renamed into place)
    curl     the peer: `curl -o` of the same download URL

Prints the median seconds of each and the ratios upload/copy and pull/curl.

    .venv/bin/python benchmarks/build_store.py                 # 256 MiB, 5 rounds
    .venv/bin/python benchmarks/build_store.py --mib 1024 --rounds 3 --json out.json

Goal (issue 16): upload at most 4x the copy, pull at most 2x curl.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from imagefactory.builder.master import MasterClient
from imagefactory.builder.upload import sha256_digest, upload
from imagefactory.tokens import builder_token

BIN = Path(sys.executable).parent
SECRET = "bench-secret"
ADMIN = "bench-admin"


def start_server(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    (workdir / "secret").write_text(SECRET)
    (workdir / "admin").write_text(ADMIN)
    argv = [
        str(BIN / "imagefactory"), "serve", "--port", "0", "--db", str(workdir / "db.sqlite"),
        "--secret-file", str(workdir / "secret"), "--admin-token-file", str(workdir / "admin"),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode()
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].strip()
    raise SystemExit("serve did not start")


def pipeline_archive() -> bytes:
    spec = b'{"format": 1, "name": "bench", "tasks": []}'
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("pipeline.json")
        info.size = len(spec)
        tar.addfile(info, io.BytesIO(spec))
    return gzip.compress(raw.getvalue())


def random_file(path: Path, mib: int) -> None:
    with path.open("wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1024 * 1024))


def timed_copy(source: Path, dest: Path) -> float:
    start = time.perf_counter()
    with source.open("rb") as src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, 1024 * 1024)
        out.flush()
        os.fsync(out.fileno())
    return time.perf_counter() - start


def claim_and_upload(
    url: str, admin: httpx.Client, builder: MasterClient, path: Path
) -> tuple[dict[str, Any], str, float]:
    """Submit a build, claim it, upload `path` for it: (build, digest, upload seconds)."""
    body = {"target": "x86_64-linux", "format": "qcow2", "pipeline": "bench"}
    admin.post(f"{url}/v1/builds", json=body).raise_for_status()
    job = builder.claim(["x86_64-linux"], ["qcow2"], 5)
    assert job is not None
    build: dict[str, Any] = job["build"]
    digest = sha256_digest(path)
    start = time.perf_counter()
    upload(builder, build["build_id"], build["attempt"], path, digest)
    return build, digest, time.perf_counter() - start


def one_upload(url: str, admin: httpx.Client, builder: MasterClient, path: Path) -> float:
    """A timed upload; the build then fails so that the next round can queue the same
    inputs again."""
    build, _, elapsed = claim_and_upload(url, admin, builder, path)
    builder.finish(build["build_id"], build["attempt"], {"state": "failed", "error": "bench"})
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed as the download peer")
    times: dict[str, list[float]] = {"upload": [], "copy": [], "pull": [], "curl": []}
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        work = Path(tmp)
        proc, url = start_server(work)
        admin = httpx.Client(headers={"Authorization": f"Bearer {ADMIN}"}, timeout=600)
        builder = MasterClient(url, "bench", builder_token(SECRET, "bench"))
        try:
            admin.put(f"{url}/v1/pipelines/bench", content=pipeline_archive()).raise_for_status()
            source = work / "artifact"
            for _ in range(args.rounds):
                random_file(source, args.mib)
                times["upload"].append(one_upload(url, admin, builder, source))
                times["copy"].append(timed_copy(source, work / "copy"))
                admin.post(f"{url}/v1/environments/prune").raise_for_status()
            digest = stored_environment(url, admin, builder, source)
            for _ in range(args.rounds):
                times["pull"].append(timed_pull(url, work, digest))
                times["curl"].append(timed_curl(url, work, digest))
        finally:
            builder.close()
            admin.close()
            proc.terminate()
            proc.wait(timeout=60)
    medians = {k: statistics.median(v) for k, v in times.items()}
    figures: dict[str, Any] = {
        "mib": args.mib,
        "rounds": args.rounds,
        "median_s": medians,
        "upload_over_copy": medians["upload"] / medians["copy"],
        "pull_over_curl": medians["pull"] / medians["curl"],
    }
    for name, seconds in medians.items():
        print(f"{name:7} median {seconds:7.3f} s  ({args.mib / seconds:7.0f} MiB/s)")
    up, pull = figures["upload_over_copy"], figures["pull_over_curl"]
    print(f"upload/copy {up:.2f}x   pull/curl {pull:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


def stored_environment(url: str, admin: httpx.Client, builder: MasterClient, path: Path) -> str:
    build, digest, _ = claim_and_upload(url, admin, builder, path)
    artifact = {"name": "image.qcow2", "digest": digest, "size": path.stat().st_size}
    outcome = {"state": "succeeded", "artifacts": [artifact]}
    builder.finish(build["build_id"], build["attempt"], outcome)
    return digest


def timed_pull(url: str, work: Path, digest: str) -> float:
    out = work / "pulled"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(BIN / "imagefactory"), "environments", "pull", digest, "-o", str(out),
            "--url", url, "--admin-token-file", str(work / "admin")]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - start


def timed_curl(url: str, work: Path, digest: str) -> float:
    out = work / "curled"
    argv = ["curl", "-sSf", "-o", str(out), "-H", f"Authorization: Bearer {ADMIN}",
            f"{url}/v1/environments/{digest}"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(argv, check=True)
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
