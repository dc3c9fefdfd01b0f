"""A private registry for tests: Debian's docker-registry (the CNCF distribution registry)
on loopback, with a temporary configuration and storage, stopped by pid at the end."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.integration.services_harness import free_port

TOOLS = ("docker-registry", "skopeo", "umoci")
needs_registry_tools = pytest.mark.skipif(
    not all(shutil.which(p) for p in TOOLS),
    reason="needs docker-registry, skopeo and umoci (scripts/setup-host.sh)",
)


@contextmanager
def local_registry(workdir: Path) -> Iterator[str]:
    """`http://127.0.0.1:PORT` of a plain-HTTP registry storing under `workdir`."""
    port = free_port()
    config = workdir / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'registry'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log_path = workdir / "registry.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/v2/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "registry did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
