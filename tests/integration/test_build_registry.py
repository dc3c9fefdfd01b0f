"""OCI environments go to a real registry: Debian's docker-registry (the CNCF distribution
registry) on loopback with a temporary config and storage, skopeo to push and inspect."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefactory.builder.push import push_oci, registry_destination, repository_name
from imagefactory.cli.bake import FORMATS
from tests.integration.build_fleet import Fleet, admin, ended, publish_pipelines, submit, wait_for
from tests.registry import local_registry, needs_registry_tools

pytestmark = [pytest.mark.timeout(900), needs_registry_tools]


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """`http://127.0.0.1:PORT` of a private registry, stopped by pid afterwards."""
    with local_registry(tmp_path) as url:
        yield url


def inspect_digest(registry: str, reference: str) -> str:
    destination, _ = registry_destination(registry, reference)
    done = subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", destination],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    digest: str = json.loads(done.stdout)["Digest"]
    return digest


def test_push_an_oci_layout(registry: str, tmp_path: Path) -> None:
    """The push step on a layout umoci makes (independent of any bake format)."""
    layout = tmp_path / "layout"
    payload = tmp_path / "payload.txt"
    payload.write_text("fleetbake\n")
    for argv in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", f"{layout}:latest"],
        ["umoci", "insert", "--image", f"{layout}:latest", str(payload), "/payload.txt"],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
    [manifest] = json.loads((layout / "index.json").read_text())["manifests"]
    pushed = push_oci(layout, registry, "fleetbake/demo:b1")
    assert pushed == {
        "reference": f"{registry.removeprefix('http://')}/fleetbake/demo:b1",
        "digest": manifest["digest"],
    }
    assert inspect_digest(registry, "fleetbake/demo:b1") == manifest["digest"]


def test_registry_names() -> None:
    assert repository_name("ETL_demo..v2") == "etl-demo-v2"
    assert registry_destination("http://127.0.0.1:5000/", "a/b:c") == (
        "docker://127.0.0.1:5000/a/b:c",
        False,
    )
    assert registry_destination("registry.example:443", "a:b") == (
        "docker://registry.example:443/a:b",
        True,
    )


@pytest.mark.skipif("oci" not in FORMATS, reason="needs the oci format")
def test_builder_pushes_oci_builds(registry: str, tmp_path: Path) -> None:
    """serve --registry: a builder bakes an oci build, pushes it, and the build records
    the digest that skopeo inspect shows."""
    fleet = Fleet(tmp_path)
    try:
        server = fleet.server(extra=("--registry", registry))
        [name] = publish_pipelines(server.url, tmp_path, 1)
        build = submit(server.url, name, "oci")
        fleet.builder(server.url, "b1")
        done = wait_for(fleet, "the oci build", ended(server.url, build["build_id"]), 600)
        assert done["state"] == "succeeded", done["error"]
        pushed = done["pushed"]
        reference = f"fleetbake/{repository_name(name)}:{build['build_id']}"
        assert pushed["reference"] == f"{registry.removeprefix('http://')}/{reference}"
        assert pushed["plain_http"] is True  # the master's setting: pullers go without TLS
        assert inspect_digest(registry, reference) == pushed["digest"]
        [artifact] = done["artifacts"]
        [env] = admin(server.url, "GET", "/v1/environments")
        assert env["digest"] == artifact["digest"] and env["format"] == "oci"
    finally:
        fleet.close()
