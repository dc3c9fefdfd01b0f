"""`make demo`: bake x86_64-linux with examples/etl, boot one node against a local
`imagefactory serve`, and print what the node reported.

Everything it writes stays under demo/ in the repository (image, server database,
secret, admin token, node state); run it again and the cached base image makes the
bake faster. The server runs only for the demo and is stopped by pid at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = REPO / "demo"
TARGET = "x86_64-linux"


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def imagefactory(*args: str) -> None:
    subprocess.run([str(BIN / "imagefactory"), *args], check=True)


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            str(BIN / "imagefactory"),
            "serve",
            "--port",
            "0",
            "--db",
            str(WORK / "core-services.db"),
            "--secret-file",
            str(WORK / "secret"),
            "--admin-token-file",
            str(WORK / "admin-token"),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        print(f"    serve: {line.rstrip()}")
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].strip()
    raise SystemExit("imagefactory serve exited before it was listening")


def main() -> int:
    WORK.mkdir(exist_ok=True)
    os.environ["XDG_STATE_HOME"] = str(WORK / "state")
    started = time.monotonic()

    step(f"bake {TARGET} with examples/etl (the first run also builds the Debian base)")
    imagefactory("bake", "--target", TARGET, "--pipeline", str(REPO / "examples" / "etl"),
                 "--output", str(WORK / "images"))  # fmt: skip

    step("start the core services on loopback")
    server, url = start_server()
    admin = ["--url", url, "--admin-token-file", str(WORK / "admin-token")]
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    try:
        step(f"boot node demo-1 (run {run_id}); it runs the pipeline, reports and powers off")
        imagefactory(
            "boot", str(WORK / "images" / TARGET), "--node-id", "demo-1", "--run-id", run_id,
            "--master", url, "--secret-file", str(WORK / "secret"),
            "--env", "ETL_GREETING=hello from make demo", "--wait", "poweroff",
        )  # fmt: skip
        step("what the node reported")
        imagefactory("report", run_id, *admin)
        step("the fleet, as the master sees it")
        imagefactory("nodes", *admin)
        step("the combined log (first 15 lines)")
        log = subprocess.run([str(BIN / "imagefactory"), "logs", run_id, *admin],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        print("\n".join(log.splitlines()[:15]))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; files are in {WORK}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        print(f"demo failed: {' '.join(map(str, exc.cmd[:2]))} exited {exc.returncode}",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
