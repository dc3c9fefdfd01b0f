"""manifest.json and SHA256SUMS."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagefactory.bake import manifest
from imagefactory.bake.artifacts import Artifacts
from imagefactory.bake.base import BaseImage
from imagefactory.errors import UserError
from imagefactory.targets import get_target


def test_parse_packages_sorted_and_skips_junk() -> None:
    rows = manifest.parse_packages("zstd\t1.5\tamd64\nbroken line\nbash\t5.2\tamd64\n")
    assert rows == [
        {"name": "bash", "version": "5.2", "arch": "amd64"},
        {"name": "zstd", "version": "1.5", "arch": "amd64"},
    ]


def test_a_build_without_its_report_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "x.qcow2"
    image.write_bytes(b"img")
    arts = Artifacts(tmp_path, "hello", "ab" * 32, "0.1.0")
    base = BaseImage(tmp_path / "b.qcow2", "cd" * 32, "k", {}, "built")
    with pytest.raises(UserError, match="did not report packages.tsv, guest.env"):
        manifest.build_manifest(get_target("x86_64-linux"), image, "ef" * 32, arts, base, "tcg",
                                (1, 6, 6), tmp_path / "nothing", {})  # fmt: skip


def test_manifest_fields(tmp_path: Path) -> None:
    image = tmp_path / "x86_64-linux.qcow2"
    image.write_bytes(b"img")
    report = tmp_path / "report"
    report.mkdir()
    (report / "packages.tsv").write_text("python3\t3.11.2-1\tamd64\n")
    (report / "guest.env").write_text("kernel=6.1.0-56-cloud-amd64\npython=3.11.2\n")
    arts = Artifacts(tmp_path, "hello", "ab" * 32, "0.1.0")
    base = BaseImage(tmp_path / "b.qcow2", "cd" * 32, "k" * 64, {"arch": "amd64", "files": {}},
                     "cached")  # fmt: skip
    doc = manifest.build_manifest(
        get_target("x86_64-linux"), image, "ef" * 32, arts, base, "tcg", (1, 6, 6), report,
        {"packer": 100.0, "total": 120.5},
    )  # fmt: skip
    assert doc["target"] == "x86_64-linux"
    assert doc["image"] == {"file": image.name, "format": "qcow2", "sha256": "ef" * 32, "size": 3}
    assert doc["pipeline"] == {"name": "hello", "sha256": "ab" * 32,
                               "path": "/opt/executor/pipeline.tar.gz"}  # fmt: skip
    assert doc["versions"]["packer"] == "1.6.6"
    assert doc["versions"]["guest_python"] == "3.11.2"
    assert doc["versions"]["executor"] == "0.1.0"
    assert doc["base"]["inputs"] == {"arch": "amd64"}  # guest files are in the key only
    assert doc["stages_s"] == {"packer": 100.0, "total": 120.5}
    assert doc["packages"] == [{"name": "python3", "version": "3.11.2-1", "arch": "amd64"}]
    assert doc["created_at"].endswith("Z")
    manifest.write(tmp_path, doc, image, "ef" * 32)
    assert json.loads((tmp_path / "manifest.json").read_text()) == doc
    assert (tmp_path / "SHA256SUMS").read_text() == f"{'ef' * 32}  {image.name}\n"
