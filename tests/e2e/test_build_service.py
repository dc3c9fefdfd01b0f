"""End to end through the build service: submit a qcow2 build of examples/etl to a real
`imagefactory serve`; a real `imagefactory builder` bakes it (Packer, QEMU under TCG) and
uploads it; `environments pull` fetches it by digest, interrupted once and resumed;
`imagefactory boot` boots the pulled image and the node reports to the same master."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e import fleet
from tests.integration.build_fleet import Fleet, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.timeout(5400)]

ETL = fleet.REPO / "examples" / "etl"
BAKE_TIMEOUT_S = 3600.0
"""A qcow2 bake under TCG takes minutes; a cold base (first run on a machine) far more."""


def run_cli(server_url: str, admin_token: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fleet.imagefactory(*args, "--url", server_url, "--admin-token-file", str(admin_token))


def interrupted_pull(argv: list[str], part: Path, output: Path) -> int:
    """Start a pull and kill it once part of the file is there; returns the bytes kept."""
    for _ in range(5):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if part.exists() and part.stat().st_size > 0:
                    proc.send_signal(signal.SIGSTOP)
                    proc.send_signal(signal.SIGKILL)
                    break
                time.sleep(0.002)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=60)
        if part.exists():
            return part.stat().st_size
        for leftover in output.glob("*.qcow2"):  # it finished first: try again
            leftover.unlink()
    raise AssertionError("could not interrupt a pull in five tries")


def test_build_pull_boot(tmp_path: Path) -> None:
    builds = Fleet(tmp_path)
    try:
        server = builds.server(lease_s=120.0, name="master")
        admin_token = server.admin_token_file
        archive = tmp_path / "etl.tar.gz"
        subprocess.run(
            [str(fleet.BIN / "executor"), "pack", str(ETL), "-o", str(archive)], check=True
        )
        published = run_cli(server.url, admin_token, "publish", "etl", str(archive))
        assert published.returncode == 0, published.stderr
        submitted = run_cli(
            server.url, admin_token, "builds", "submit",
            "--target", "x86_64-linux", "--format", "qcow2", "--pipeline", "etl", "--json",
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stderr
        build_id = json.loads(submitted.stdout)["build_id"]
        builds.builder(server.url, "e2e-builder")

        def done() -> dict[str, object] | None:
            shown = run_cli(server.url, admin_token, "builds", "show", build_id, "--json")
            build: dict[str, object] = json.loads(shown.stdout)
            return build if build["state"] in ("succeeded", "failed", "cancelled") else None

        build = wait_for(builds, "the qcow2 build", done, BAKE_TIMEOUT_S)
        assert build["state"] == "succeeded", build["error"]
        assert build["builder_id"] == "e2e-builder" and build["stages"], build
        [artifact] = build["artifacts"]
        digest = artifact["digest"]
        assert artifact["name"] == "x86_64-linux.qcow2"

        output = tmp_path / "pulled"
        part = output / f".{digest.removeprefix('sha256:')}.part"
        pull = [
            str(fleet.BIN / "imagefactory"), "environments", "pull", digest, "-o", str(output),
            "--url", server.url, "--admin-token-file", str(admin_token),
        ]  # fmt: skip
        kept = interrupted_pull(pull, part, output)
        assert 0 < kept < artifact["size"]
        resumed = subprocess.run(pull, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr
        assert "resuming at" in resumed.stderr
        image = output / "x86_64-linux.qcow2"
        assert resumed.stdout.strip() == str(image) and not part.exists()
        assert image.stat().st_size == artifact["size"]

        node_id, run_id = "e2e-built", f"run-{uuid.uuid4().hex[:12]}"
        node = fleet.boot(image, server.url, server.secret_file, node_id, run_id, tmp_path / "n")
        try:
            code, err = node.wait()
            assert code == 0, f"boot exited {code}: {err[-2000:]}\n{node.console_tail()}"
        finally:
            node.stop()
        got = fleet.report(server, run_id)
        assert got["status"] == "succeeded" and got["node_id"] == node_id, got
    finally:
        builds.close()
