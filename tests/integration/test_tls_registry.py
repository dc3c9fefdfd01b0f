"""The builder's skopeo push against a real registry over TLS: Debian's docker-registry on
loopback with a certificate from a CA made by the test. With the fleet CA the push goes
through and the registry holds the layout's digest; without it skopeo refuses the
certificate; a plain-HTTP registry beyond loopback is refused before any connection."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from imagefactory import pki
from imagefactory.builder.push import PlainRegistry, push_oci, registry_destination
from imagefactory.run import CommandError
from tests.integration.services_harness import free_port

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not all(shutil.which(p) for p in ("docker-registry", "skopeo", "umoci")),
        reason="needs docker-registry, skopeo and umoci (scripts/setup-host.sh)",
    ),
]


@pytest.fixture
def tls_registry(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(`127.0.0.1:PORT` of a registry serving HTTPS, the CA bundle that trusts it)."""
    pki.create_ca(tmp_path / "ca")
    cert = pki.issue(tmp_path / "ca", "registry", ("127.0.0.1",))
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'store'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"  tls:\n    certificate: {cert.cert}\n    key: {cert.key}\n"
    )
    bundle = tmp_path / "ca" / "bundle.crt"
    with (tmp_path / "registry.log").open("wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    trust = ssl.create_default_context(cafile=str(bundle))
    try:
        for _ in range(300):
            assert proc.poll() is None, (tmp_path / "registry.log").read_text()
            try:
                httpx.get(f"https://127.0.0.1:{port}/v2/", verify=trust, timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield f"127.0.0.1:{port}", bundle
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_push_verifies_the_registry_with_the_fleet_ca(
    tls_registry: tuple[str, Path], tmp_path: Path
) -> None:
    registry, bundle = tls_registry
    layout = tmp_path / "layout"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True, timeout=60)
    subprocess.run(["umoci", "new", "--image", f"{layout}:latest"], check=True, timeout=60)
    [manifest] = json.loads((layout / "index.json").read_text())["manifests"]
    with pytest.raises(CommandError) as refused:
        push_oci(layout, registry, "fleetbake/untrusted:b1")
    assert "certificate" in refused.value.message()
    pushed = push_oci(layout, registry, "fleetbake/demo:b1", ca_file=bundle)
    assert pushed == {"reference": f"{registry}/fleetbake/demo:b1", "digest": manifest["digest"]}


def test_plain_http_registry_beyond_loopback_needs_the_opt_out() -> None:
    with pytest.raises(PlainRegistry, match="--insecure"):
        registry_destination("http://10.0.0.5:5000", "a:b")
    assert registry_destination("http://10.0.0.5:5000", "a:b", allow_plain=True) == (
        "docker://10.0.0.5:5000/a:b",
        False,
    )
