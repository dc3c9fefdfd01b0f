"""The aarch64 container image: built under qemu-user (binfmt_misc), as the VM base is,
run as a node with runc under qemu-user, and listed with the x86_64 image in one
multi-arch index. Slow (every process of the build and the run is emulated): nightly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imagefactory.bake.oci import write_multiarch
from imagefactory.host.doctor import binfmt_check
from imagefactory.targets import get_target
from tests.integration.oci_image import REPO, bake_oci, imagefactory

ARM = get_target("aarch64-linux")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(5400),  # the base under qemu-user, behind the heavy lock
    pytest.mark.skipif(
        not binfmt_check(ARM).ok, reason="needs qemu-user-static in binfmt_misc (setup-host.sh)"
    ),
]


def test_aarch64_image_runs_under_qemu_user(tmp_path: Path) -> None:
    hello = REPO / "examples" / "hello"
    arm = bake_oci(hello, tmp_path / "arm", "aarch64-linux")
    doc = json.loads((arm.dir / "manifest.json").read_text())
    assert doc["oci"]["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    assert {p["arch"] for p in doc["packages"]} <= {"arm64", "all"}
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{arm.dir}:latest"], capture_output=True, text=True, check=True
    )
    assert json.loads(inspect.stdout)["Architecture"] == "arm64"

    if os.geteuid() == 0 and shutil.which("runc"):
        state_home = tmp_path / "state"
        result = imagefactory(
            "boot", str(arm.dir), "--runtime", "runc", "--node-id", "arm", "--run-id", "ra",
            "--wait", "exit", "--timeout", "1200", "--json", state_home=state_home,
            timeout_s=1500,
        )  # fmt: skip
        log = state_home / "imagefactory" / "nodes" / "arm" / "console.log"
        assert result.returncode == 0, result.stderr + (log.read_text() if log.exists() else "")
        assert json.loads(result.stdout)[0]["agent_state"] == "succeeded"
        run_dir = state_home / "imagefactory" / "nodes" / "arm" / "state" / "runs" / "ra"
        assert "hello, fleet" in (run_dir / "combined.log").read_text()

    x86 = bake_oci(hello, tmp_path / "x86")
    index_dir = write_multiarch(tmp_path, [x86, arm])
    [entry] = json.loads((index_dir / "index.json").read_text())["manifests"]
    nested = json.loads((index_dir / "blobs/sha256" / entry["digest"][7:]).read_text())
    platforms = [m["platform"]["architecture"] for m in nested["manifests"]]
    assert platforms == ["amd64", "arm64"]
    for arch in ("amd64", "arm64"):
        chosen = subprocess.run(
            ["skopeo", "--override-arch", arch, "inspect", f"oci:{index_dir}:latest"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert json.loads(chosen.stdout)["Architecture"] == arch
