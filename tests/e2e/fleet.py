"""Drive the product the way users do: `imagefactory boot` processes against a real
`imagefactory serve`, and the admin commands to read what the nodes reported.

Each test gets its own XDG_STATE_HOME, so node state and console logs of one test never
mix with another's; they are copied to artifacts/ for the CI job to upload.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagefactory.client import AdminClient
from imagefactory.errors import UserError
from tests.integration.services_harness import ServerProcess

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FLEETBAKE_ARTIFACTS", REPO / "artifacts"))
BOOT_TIMEOUT_S = 1500
"""Per boot under TCG: a Debian boot with cloud-init takes about 2 minutes, more when
two guests share two cores; generous so that a slow machine does not fail the test."""

TARGETS = [
    pytest.param("x86_64-linux", id="x86_64"),
    # its first test may build the arm64 base under qemu-user (10-45 min here) before the
    # bake and the boots under TCG
    pytest.param(
        "aarch64-linux", id="aarch64", marks=[pytest.mark.slow, pytest.mark.timeout(3 * 3600)]
    ),
]
"""The targets the e2e tests are parametrized with (`target_name`)."""


def imagefactory(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "imagefactory"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=False,
        timeout=timeout,
    )


@dataclass
class Boot:
    """One `imagefactory boot` process for one node."""

    node_id: str
    run_id: str
    state_home: Path
    proc: subprocess.Popen[str]

    def wait(self) -> tuple[int, str]:
        _, err = self.proc.communicate(timeout=BOOT_TIMEOUT_S + 120)
        return self.proc.returncode, err

    def console(self) -> str:
        log = self.state_home / "imagefactory" / "nodes" / self.node_id / "console.log"
        return log.read_text(errors="replace") if log.exists() else ""

    def console_tail(self, lines: int = 40) -> str:
        text = self.console().splitlines()
        return "\n".join(text[-lines:]) if text else "(no console log)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # boot's own handler kills the VM and removes the overlay
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def prepared_server(workdir: Path, port: int = 0) -> ServerProcess:
    """A server whose secret and admin token exist before it starts, so nodes can be
    seeded with their tokens while the master is still down."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(workdir, port=port)
    for path in (server.secret_file, server.admin_token_file):
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return server


def boot(
    image: Path,
    server_url: str,
    secret_file: Path,
    node_id: str,
    run_id: str,
    state_home: Path,
    *,
    backend: str = "qemu",
    env: dict[str, str] | None = None,
) -> Boot:
    argv = [
        str(BIN / "imagefactory"), "boot", str(image),
        "--node-id", node_id, "--run-id", run_id,
        "--master", server_url, "--secret-file", str(secret_file),
        "--backend", backend, "--wait", "poweroff", "--timeout", str(BOOT_TIMEOUT_S),
        "--cpus", "1",
    ]  # fmt: skip
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XDG_STATE_HOME": str(state_home)},
    )
    return Boot(node_id, run_id, state_home, proc)


def admin(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return imagefactory(
        *args, "--url", server.url, "--admin-token-file", str(server.admin_token_file)
    )


def report(server: ServerProcess, run_id: str) -> dict[str, Any]:
    result = admin(server, "report", run_id, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def combined_log(server: ServerProcess, run_id: str) -> str:
    result = admin(server, "logs", run_id)
    assert result.returncode == 0, result.stderr
    return result.stdout


def nodes(server: ServerProcess) -> dict[str, dict[str, Any]]:
    result = admin(server, "nodes", "--json")
    assert result.returncode == 0, result.stderr
    return {row["node_id"]: row for row in json.loads(result.stdout)}


@dataclass
class NodeWatcher:
    """Polls the master's node list while the nodes run: which states each node was seen
    alive in proves that heartbeats arrived during the run (not only at the end).

    It asks the admin API directly, twice a second: a CLI process per poll costs seconds
    on a loaded 2-core machine, enough to miss a short `running` phase."""

    server: ServerProcess
    period_s: float = 0.5
    seen: dict[str, set[str]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> NodeWatcher:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _poll(self) -> None:
        token = self.server.admin_token_file.read_text().strip()
        with AdminClient(self.server.url, token, timeout_s=10) as client:
            while not self._stop.wait(self.period_s):
                try:
                    rows = client.get_json("/v1/nodes")
                except UserError:  # the master not up yet, or busy
                    continue
                for row in rows:
                    if row["alive"]:
                        self.seen.setdefault(row["node_id"], set()).add(row["state"])


def save_artifacts(name: str, boots: list[Boot], extra: dict[str, str]) -> None:
    """Console logs, reports and combined logs for the CI job to upload."""
    target = ARTIFACTS / "e2e" / name
    target.mkdir(parents=True, exist_ok=True)
    for b in boots:
        for log in b.state_home.glob(f"imagefactory/nodes/{b.node_id}/*.log"):
            shutil.copy(log, target / f"{b.node_id}-{log.name}")
    for filename, text in extra.items():
        (target / filename).write_text(text)


def wait_for_console(b: Boot, needle: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in b.console():
            return True
        if b.proc.poll() is not None:
            return False
        time.sleep(2)
    return False
