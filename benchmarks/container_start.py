"""Container start -> first heartbeat the master receives, beside a VM boot's.

Each start is a user's `imagefactory boot DIR/T-oci --runtime runc --wait none --keep`
against a real `imagefactory serve` on loopback (benchmarks/boot.py's), then
`imagefactory stop`. Two figures per start:

    container  `runc run`'s process start (from /proc/PID/stat) -> the first heartbeat's
               `last_seen` in GET /v1/nodes (polled every 0.05 s)
    command    the boot command's start -> the same heartbeat (adds the CLI's start,
               netns and bundle set-up; the image is unpacked once, before the first)

With --vm-image, the same image's VM (a qcow2 bake of the same pipeline) is booted the
same way (QEMU's process start -> first heartbeat), one boot at a time after the
containers: under TCG here (no KVM) that takes about a minute per boot. Also prints the
image's compressed size. Medians; run it alone (inside `flock
/tmp/fleetbake-heavy.lock`) when VMs are booted.

    .venv/bin/python benchmarks/container_start.py --image OUT/x86_64-linux-oci
    .venv/bin/python benchmarks/container_start.py --image OUT/x86_64-linux-oci \\
        --vm-image OUT/x86_64-linux --vm-boots 3 --json out.json

Without --image it bakes examples/hello as a container image first.

Goal (issue 14): container start to first heartbeat, median at most 1 s over 10 starts.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from boot import Master, process_start, serve, wall

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
POLL_S = 0.05


def imagefactory(env: dict[str, str], *args: str, timeout: float = 900) -> str:
    proc = subprocess.run(
        [str(BIN / "imagefactory"), *args], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"Error: imagefactory {args[0]} failed:\n{proc.stderr}")
    return proc.stdout


def first_heartbeat(master: Master, node_id: str, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for node in master.get("/v1/nodes"):
            if node["node_id"] == node_id:
                return wall(node["last_seen"])
        time.sleep(POLL_S)
    sys.exit(f"Error: no heartbeat from {node_id} after {timeout_s:.0f} s")


def one_start(
    env: dict[str, str], master: Master, image: Path, node_id: str, extra: list[str]
) -> dict[str, float]:
    started = time.time()
    imagefactory(
        env, "boot", str(image), "--node-id", node_id, "--master", master.url,
        "--secret-file", str(master.secret_file), "--wait", "none", "--keep", *extra,
    )  # fmt: skip
    record = json.loads(
        (Path(env["XDG_STATE_HOME"]) / "imagefactory/nodes" / node_id / "node.json").read_text()
    )
    process = process_start(record["pid"])
    beat = first_heartbeat(master, node_id, 900)
    imagefactory(env, "stop", node_id)
    return {"process_s": round(beat - process, 3), "command_s": round(beat - started, 3)}


def summary(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in rows) for key in ("process_s", "command_s")}


@click.command()
@click.option("--image", type=click.Path(path_type=Path), help="A `bake --format oci` dir.")
@click.option("--starts", default=10, show_default=True, help="Container starts.")
@click.option("--vm-image", type=click.Path(path_type=Path), help="A VM bake of the same pipeline.")
@click.option("--vm-boots", default=1, show_default=True, help="VM boots (about 1 min each).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the figures.")
def main(
    image: Path | None, starts: int, vm_image: Path | None, vm_boots: int, json_out: Path | None
) -> None:
    with tempfile.TemporaryDirectory(prefix="fleetbake-ctrbench-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
        if image is None:
            hello = str(REPO / "examples" / "hello")
            imagefactory(env, "bake", "-t", "x86_64-linux", "--format", "oci",
                         "-p", hello, "-o", str(tmp / "out"))  # fmt: skip
            image = tmp / "out" / "x86_64-linux-oci"
        doc = json.loads((image / "manifest.json").read_text())
        results: dict[str, Any] = {
            "image_compressed_mb": round(doc["oci"]["compressed_size"] / 1e6, 1),
            "archive_mb": round(doc["image"]["size"] / 1e6, 1),
        }
        with serve(tmp) as master:
            # The first start unpacks the image (once per digest): not a start to time.
            one_start(env, master, image, "warm-up", ["--runtime", "runc"])
            rows = []
            for i in range(1, starts + 1):
                rows.append(one_start(env, master, image, f"c{i}", ["--runtime", "runc"]))
                click.echo(f"container {i}: {rows[-1]}", err=True)
            results["container"] = {"starts": rows, "median": summary(rows)}
            if vm_image is not None:
                vms = []
                for i in range(1, vm_boots + 1):
                    vms.append(one_start(env, master, vm_image, f"v{i}", ["--cpus", "1"]))
                    click.echo(f"vm {i}: {vms[-1]}", err=True)
                results["vm"] = {"boots": vms, "median": summary(vms)}
                ratio = (
                    results["vm"]["median"]["process_s"]
                    / results["container"]["median"]["process_s"]
                )
                results["vm_over_container"] = round(ratio, 1)
    click.echo(json.dumps({k: v for k, v in results.items() if k != "container"} | {
        "container_median": results["container"]["median"]}, indent=2))  # fmt: skip
    if json_out is not None:
        json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
