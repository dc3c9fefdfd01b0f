"""`bake --format oci` against the real tools: umoci and skopeo accept the layout and the
archive, the image holds the executor and no VM parts, and two bakes give one digest."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from imagefactory.bake.oci import write_multiarch
from imagefactory.bake.options import BakeResult
from tests.integration.oci_image import REPO, bake_oci

pytestmark = pytest.mark.timeout(1200)  # the first bake builds the container base
ETL = REPO / "examples" / "etl"
SIZE_BUDGET = 60_000_000
"""The issue's budget for the compressed x86_64 image."""


def tool(*argv: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def etl_oci(tmp_path_factory: pytest.TempPathFactory) -> BakeResult:
    return bake_oci(ETL, tmp_path_factory.mktemp("oci"))


def test_output_files_and_sums(etl_oci: BakeResult) -> None:
    out = etl_oci.dir
    assert out.name == "x86_64-linux-oci"
    assert {"oci-layout", "index.json", "blobs", "manifest.json", "SHA256SUMS"} <= {
        p.name for p in out.iterdir()
    }
    assert etl_oci.image == out / "x86_64-linux-oci.tar"
    sums = subprocess.run(
        ["sha256sum", "--check", "--strict", "SHA256SUMS"], cwd=out, capture_output=True,
        text=True, check=False,
    )  # fmt: skip
    assert sums.returncode == 0 and "x86_64-linux-oci.tar: OK" in sums.stdout, sums.stderr
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["kind"] == "oci" and doc["target"] == "x86_64-linux"
    assert doc["oci"]["platform"] == {"architecture": "amd64", "os": "linux"}
    assert doc["oci"]["compressed_size"] < SIZE_BUDGET
    names = {p["name"] for p in doc["packages"]}
    assert {"python3", "tini"} <= names
    assert not names & {"systemd", "cloud-init", "grub-pc-bin", "linux-image-cloud-amd64"}


def test_skopeo_reads_layout_and_archive(etl_oci: BakeResult) -> None:
    doc = json.loads((etl_oci.dir / "manifest.json").read_text())
    layout = json.loads(tool("skopeo", "inspect", f"oci:{etl_oci.dir}:latest").stdout)
    assert layout["Digest"] == doc["oci"]["manifest_digest"]
    assert layout["Architecture"] == "amd64" and layout["Os"] == "linux"
    archive = json.loads(tool("skopeo", "inspect", f"docker-archive:{etl_oci.image}").stdout)
    assert archive["Architecture"] == "amd64"
    assert len(archive["Layers"]) == 2
    config = json.loads(tool("skopeo", "inspect", "--config", f"oci:{etl_oci.dir}:latest").stdout)
    assert config["config"]["Entrypoint"][:2] == ["/usr/bin/tini", "--"]
    assert "/var/lib/executor" in config["config"]["Volumes"]


def test_umoci_unpacks_the_executor_without_vm_parts(etl_oci: BakeResult, tmp_path: Path) -> None:
    tool("umoci", "stat", "--image", f"{etl_oci.dir}:latest")
    tool("umoci", "unpack", "--image", f"{etl_oci.dir}:latest", str(tmp_path / "bundle"))
    rootfs = tmp_path / "bundle" / "rootfs"
    for present in ("usr/local/bin/executor", "usr/bin/tini", "opt/executor/pipeline.tar.gz",
                    "usr/bin/python3", "opt/executor/lib/executor/__init__.py"):  # fmt: skip
        assert (rootfs / present).exists(), present
    for absent in (
        "boot/grub",
        "lib/systemd/systemd",
        "usr/bin/cloud-init",
    ):
        assert not (rootfs / absent).exists(), absent
    assert not list((rootfs / "boot").glob("vmlinuz*"))
    assert not list((rootfs / "var/lib/apt/lists").glob("*Packages*"))  # no apt lists
    state = rootfs / "var" / "lib" / "executor"
    assert state.stat().st_mode & 0o777 == 0o700 and state.stat().st_uid != 0
    # The executor is byte-compiled for the image's Python, with no time in the .pyc.
    assert list((rootfs / "opt/executor/lib/executor/__pycache__").glob("*.cpython-311.pyc"))
    # The image's python runs the executor from its layout.
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["process"]["args"] == ["/usr/bin/tini", "--", "/usr/local/bin/executor", "agent"]


def test_two_bakes_give_the_same_digest(etl_oci: BakeResult, tmp_path: Path) -> None:
    again = bake_oci(ETL, tmp_path / "again")
    first = json.loads((etl_oci.dir / "manifest.json").read_text())["oci"]
    second = json.loads((again.dir / "manifest.json").read_text())["oci"]
    assert second["manifest_digest"] == first["manifest_digest"]
    assert second["layers"] == first["layers"]
    assert (again.dir / "index.json").read_bytes() == (etl_oci.dir / "index.json").read_bytes()


def test_multiarch_index_lists_each_platform(etl_oci: BakeResult, tmp_path: Path) -> None:
    """The index step on its own (the aarch64 bake itself is in the slow test)."""
    index_dir = write_multiarch(tmp_path, [etl_oci])
    [entry] = json.loads((index_dir / "index.json").read_text())["manifests"]
    assert entry["mediaType"] == "application/vnd.oci.image.index.v1+json"
    nested = json.loads((index_dir / "blobs/sha256" / entry["digest"][7:]).read_text())
    [image] = nested["manifests"]
    assert image["platform"] == {"architecture": "amd64", "os": "linux"}
    chosen = tool("skopeo", "--override-arch", "amd64", "inspect", f"oci:{index_dir}:latest")
    found = json.loads(chosen.stdout)
    assert found["Architecture"] == "amd64" and found["Digest"] == entry["digest"]
