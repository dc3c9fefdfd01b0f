"""The deterministic layer writer and the OCI layout documents (bake/ocilayer.py,
bake/ocilayout.py): same tree, same bytes; what goes into a layer and what does not."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from imagefactory.bake import ocilayer
from imagefactory.bake.ocilayout import (
    MEDIA_CONFIG,
    MEDIA_MANIFEST,
    ImageConfig,
    Layout,
    Platform,
    canonical,
    config_doc,
)

EPOCH = 1_700_000_000


def make_tree(root: Path, mtime: float) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "b.conf").write_text("b\n")
    (root / "etc" / "a.conf").write_text("a\n")
    os.link(root / "etc" / "a.conf", root / "etc" / "a-link.conf")
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\n")
    (root / "bin" / "tool").chmod(0o755)
    (root / "bin" / "sh").symlink_to("tool")
    (root / "dev").mkdir()
    (root / "dev" / "inside").write_text("never in a layer\n")
    (root / "tmp").mkdir()
    os.mkfifo(root / "etc" / "fifo")
    for path in [root, *root.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def members(layer: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(layer) as tar:
        return tar.getmembers()


def test_same_tree_same_digest_whatever_the_times(tmp_path: Path) -> None:
    make_tree(tmp_path / "one", EPOCH + 1000)
    make_tree(tmp_path / "two", EPOCH + 99999)
    a = ocilayer.write_layer(tmp_path / "one", tmp_path / "a.tar.gz", EPOCH)
    b = ocilayer.write_layer(tmp_path / "two", tmp_path / "b.tar.gz", EPOCH)
    assert a.digest == b.digest and a.diff_id == b.diff_id
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.size == a.path.stat().st_size
    # A different epoch is a different layer.
    c = ocilayer.write_layer(tmp_path / "one", tmp_path / "c.tar.gz", EPOCH - 1)
    assert c.digest != a.digest


def test_members_sorted_clamped_anonymous(tmp_path: Path) -> None:
    make_tree(tmp_path / "root", EPOCH + 5)
    old = tmp_path / "root" / "etc" / "b.conf"
    os.utime(old, (EPOCH - 50, EPOCH - 50))
    layer = ocilayer.write_layer(tmp_path / "root", tmp_path / "l.tar.gz", EPOCH)
    found = members(layer.path)
    names = [m.name for m in found]
    assert names == [
        "bin", "bin/sh", "bin/tool", "dev", "etc", "etc/a-link.conf", "etc/a.conf",
        "etc/b.conf", "tmp",
    ]  # fmt: skip
    by_name = {m.name: m for m in found}
    assert by_name["etc/b.conf"].mtime == EPOCH - 50  # older times stay
    assert by_name["etc/a.conf"].mtime == EPOCH  # newer ones are clamped
    assert all(m.uname == "" and m.gname == "" for m in found)
    assert by_name["bin/sh"].issym() and by_name["bin/sh"].linkname == "tool"
    assert by_name["bin/tool"].mode & 0o777 == 0o755
    # The second name of a hard link is a link to the first (sorted) one.
    assert by_name["etc/a.conf"].islnk() and by_name["etc/a.conf"].linkname == "etc/a-link.conf"


def test_gzip_header_has_no_name_or_time(tmp_path: Path) -> None:
    make_tree(tmp_path / "root", EPOCH)
    layer = ocilayer.write_layer(tmp_path / "root", tmp_path / "l.tar.gz", EPOCH)
    head = layer.path.read_bytes()[:10]
    assert head[:2] == b"\x1f\x8b"
    assert head[3] & 0x08 == 0  # FNAME flag unset
    assert head[4:8] == b"\0\0\0\0"  # MTIME 0
    plain = gzip.decompress(layer.path.read_bytes())
    assert layer.diff_id == f"sha256:{hashlib.sha256(plain).hexdigest()}"


def test_root_owned_forces_root(tmp_path: Path) -> None:
    make_tree(tmp_path / "root", EPOCH)
    if os.geteuid() == 0:
        os.chown(tmp_path / "root" / "etc" / "b.conf", 1234, 4321)
    plain = ocilayer.write_layer(tmp_path / "root", tmp_path / "p.tar.gz", EPOCH)
    forced = ocilayer.write_layer(tmp_path / "root", tmp_path / "f.tar.gz", EPOCH, root_owned=True)
    assert all(m.uid == 0 and m.gid == 0 for m in members(forced.path))
    if os.geteuid() == 0:
        owner = {m.name: (m.uid, m.gid) for m in members(plain.path)}["etc/b.conf"]
        assert owner == (1234, 4321)


@pytest.mark.parametrize(("value", "expected"), [("", 0), ("1700000000", EPOCH), ("soon", 0)])
def test_source_date_epoch(monkeypatch: pytest.MonkeyPatch, value: str, expected: int) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
    assert ocilayer.source_date_epoch() == expected


def test_layout_documents(tmp_path: Path) -> None:
    make_tree(tmp_path / "root", EPOCH)
    layer = ocilayer.write_layer(tmp_path / "root", tmp_path / "l.tar.gz", EPOCH)
    config = ImageConfig(("/usr/bin/tini", "--", "agent"), ("A=1",), "999:999", "/var/lib/x",
                         volumes=("/var/lib/x",))  # fmt: skip
    arm = Platform("arm64", "v8")
    doc = config_doc(config, arm, [layer], EPOCH, ["base"])
    assert doc["architecture"] == "arm64" and doc["variant"] == "v8" and doc["os"] == "linux"
    assert doc["created"] == "2023-11-14T22:13:20Z"
    assert doc["rootfs"] == {"type": "layers", "diff_ids": [layer.diff_id]}
    assert doc["config"]["Volumes"] == {"/var/lib/x": {}}
    assert canonical(doc) == canonical(json.loads(canonical(doc)))

    layout = Layout(tmp_path / "layout")
    desc = layout.add_image(config, arm, [layer], EPOCH, ["base"])
    again = Layout(tmp_path / "layout2").add_image(config, arm, [layer], EPOCH, ["base"])
    assert desc == again and desc.media_type == MEDIA_MANIFEST
    layout.write_index([(desc, arm, "latest")])
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    [entry] = index["manifests"]
    assert entry["digest"] == desc.digest and entry["platform"]["architecture"] == "arm64"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "latest"
    manifest = json.loads((layout.blobs / desc.digest.removeprefix("sha256:")).read_bytes())
    assert manifest["config"]["mediaType"] == MEDIA_CONFIG
    assert manifest["layers"][0]["digest"] == layer.digest
    blob = layout.blobs / layer.digest.removeprefix("sha256:")
    assert blob.read_bytes() == layer.path.read_bytes()
    assert json.loads((tmp_path / "layout" / "oci-layout").read_text()) == {
        "imageLayoutVersion": "1.0.0"
    }
