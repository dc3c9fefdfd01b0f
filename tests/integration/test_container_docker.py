"""The baked archive under a real Docker daemon: `docker load` accepts it and `docker run`
runs the baked pipeline standalone, results in the state volume; `docker stop` (SIGTERM
to tini, passed to the agent) ends the run as cancelled. Runs where a daemon answers
(the nightly workflow's runner); skipped elsewhere. `boot --runtime docker` makes two
nodes that report to a real serve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from imagefactory.bake.options import BakeResult
from tests.e2e.fleet import prepared_server, report
from tests.integration.oci_image import REPO, bake_oci, imagefactory, slow_pipeline


def docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    info = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60)
    return info.returncode == 0


# The nightly Docker job sets FLEETBAKE_REQUIRE_DOCKER, so a daemon that does not answer
# there fails the job instead of skipping it.
pytestmark = [
    pytest.mark.skipif(
        not os.environ.get("FLEETBAKE_REQUIRE_DOCKER") and not docker_works(),
        reason="no Docker daemon here",
    ),
    pytest.mark.timeout(1800),  # the first bake builds the container base
]


def docker(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, timeout=timeout_s
    )


def load(image: BakeResult) -> str:
    loaded = docker("load", "-i", str(image.image))
    assert loaded.returncode == 0, loaded.stderr
    name = json.loads((image.dir / "manifest.json").read_text())["oci"]["name"]
    assert name in loaded.stdout
    return str(name)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A host directory for the agent's state volume, owned by the image's user."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    return state


def run_args(name: str, state: Path, node: str, run: str, image: str) -> list[str]:
    uid = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]["User"]
    os.chown(state, *(int(x) for x in uid.split(":")))
    return [
        "run", "--name", name, "--network", "none", "-v", f"{state}:/var/lib/executor",
        "-e", f"EXECUTOR_NODE_ID={node}", "-e", f"EXECUTOR_RUN_ID={run}", image,
    ]  # fmt: skip


def test_docker_load_and_run_standalone(tmp_path: Path, state_dir: Path) -> None:
    image = load(bake_oci(REPO / "examples" / "hello", tmp_path / "images"))
    name = f"fleetbake-test-{uuid.uuid4().hex[:8]}"
    try:
        ran = docker(*run_args(name, state_dir, "d1", "rd", image))
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert "EXECUTOR-STATUS node=d1 run=rd state=succeeded" in ran.stdout
    finally:
        docker("rm", "-f", name)
    results = json.loads((state_dir / "runs" / "rd" / "results.json").read_text())
    assert results["status"] == "succeeded"
    assert "hello, fleet" in (state_dir / "runs" / "rd" / "combined.log").read_text()


def test_docker_stop_cancels_the_run(tmp_path: Path, state_dir: Path) -> None:
    image = load(bake_oci(slow_pipeline(tmp_path / "slow"), tmp_path / "images"))
    name = f"fleetbake-test-{uuid.uuid4().hex[:8]}"
    args = run_args(name, state_dir, "d2", "rs", image)
    try:
        started = docker(args[0], "-d", *args[1:])
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + 120
        while "task wait attempt 1 started" not in read(state_dir / "runs/rs/combined.log"):
            assert time.monotonic() < deadline, docker("logs", name).stdout
            time.sleep(0.5)
        stopped = docker("stop", "-t", "30", name)
        assert stopped.returncode == 0, stopped.stderr
        logs = docker("logs", name)
        assert "state=cancelled" in logs.stdout + logs.stderr
    finally:
        docker("rm", "-f", name)
    outcome = json.loads((state_dir / "runs" / "rs" / "outcome.json").read_text())
    assert outcome["status"] == "cancelled"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_docker_containers_are_nodes(tmp_path: Path) -> None:
    """`boot --runtime docker`: two nodes report to a real serve through the forward into
    each container's own network namespace, then are removed."""
    image = bake_oci(REPO / "examples" / "hello", tmp_path / "images")
    server = prepared_server(tmp_path / "server").start()
    state_home = tmp_path / "xdg"
    try:
        booted = imagefactory(
            "boot", str(image.dir), "--runtime", "docker", "--node-id", "dk", "--run-id", "rk",
            "--count", "2", "--master", server.url, "--secret-file", str(server.secret_file),
            "--admin-token-file", str(server.admin_token_file), "--wait", "report",
            "--timeout", "300", "--json", state_home=state_home, timeout_s=900,
        )  # fmt: skip
        assert booted.returncode == 0, booted.stderr
        for i in (1, 2):
            assert report(server, f"rk-{i}")["status"] == "succeeded"
        assert docker("inspect", "fleetbake-dk-1").returncode != 0  # removed
    finally:
        imagefactory("stop", "--all", state_home=state_home)
        server.stop()
