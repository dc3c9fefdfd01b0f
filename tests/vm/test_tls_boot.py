"""The fleet over HTTPS for real: the baked x86_64 image boots under QEMU with
`--master-ca`, and its agent verifies `imagefactory serve --tls-cert` through the guestfwd
relay (the certificate names 10.0.2.100, the address the guest uses) while `boot --wait`
verifies the same master on the host's loopback with the same CA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from imagefactory import pki
from tests.baking import BakedImage
from tests.integration.services_harness import ServerProcess

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

IMAGEFACTORY = str(Path(sys.executable).with_name("imagefactory"))
BOOT_TIMEOUT_S = 1800


def console_tail(state: Path, lines: int = 40) -> str:
    logs = sorted(state.glob("**/console.log"))
    return "\n".join(
        line for log in logs for line in log.read_text(errors="replace").splitlines()[-lines:]
    )


def test_a_node_verifies_the_master_and_reports_over_https(
    baked_image: BakedImage, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    pki.create_ca(ca_dir)
    cert = pki.issue(ca_dir, "master", ("10.0.2.100", "127.0.0.1"))
    server = ServerProcess(tmp_path / "server")
    server.workdir.mkdir()
    server.extra_args = ("--tls-cert", str(cert.cert), "--tls-key", str(cert.key))
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEFACTORY_")}
    env["XDG_STATE_HOME"] = str(state)
    try:
        server.start()
        assert server.url.startswith("https://127.0.0.1:")
        boot = subprocess.run(
            [IMAGEFACTORY, "boot", str(baked_image.image), "--node-id", "tls-1",
             "--master", server.url, "--master-ca", str(ca_dir / "bundle.crt"),
             "--secret-file", str(server.secret_file),
             "--admin-token-file", str(server.admin_token_file),
             "--wait", "report", "--json", "--timeout", str(BOOT_TIMEOUT_S)],
            env=env, capture_output=True, text=True, timeout=BOOT_TIMEOUT_S + 300,
        )  # fmt: skip
        assert boot.returncode == 0, f"{boot.stderr}\n--- console:\n{console_tail(state)}"
        [node] = json.loads(boot.stdout)
        assert node["outcome"] == "report (succeeded)", node
        [row] = server.rows("reports")
        report = json.loads(row[7])
        assert report["node_id"] == "tls-1" and report["status"] == "succeeded"
        [seen] = server.rows("nodes")
        assert seen[0] == "tls-1", "heartbeats arrived over HTTPS"
    finally:
        server.stop()
        subprocess.run([IMAGEFACTORY, "stop", "--all"], env=env, capture_output=True, timeout=300)
