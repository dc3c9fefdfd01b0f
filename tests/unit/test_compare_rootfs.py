"""scripts/compare_rootfs.py: two trees compared file by file, and their package lists."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    return load_script("compare_rootfs")


def _tree(root: Path, version: str = "1.0") -> Path:
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_text(
        "Package: a\nStatus: install ok installed\nArchitecture: arm64\n"
        f"Version: {version}\n\n"
        "Package: gone\nStatus: deinstall ok config-files\nVersion: 9\n"
    )
    (root / "etc").mkdir()
    for name in ("same", "mode", "content", "type"):
        (root / "etc" / name).write_text("x")
    (root / "etc/link").symlink_to("same")
    (root / "etc/old-only").write_text("")
    return root


def test_identical_trees_are_the_same(compare: ModuleType, tmp_path: Path) -> None:
    old, new = _tree(tmp_path / "old"), _tree(tmp_path / "new")
    os.utime(new / "etc/same", (1, 1))  # timestamps do not count
    assert compare.main([str(old), str(new)]) == 0


def test_every_kind_of_difference_is_found(
    compare: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _tree(tmp_path / "old"), _tree(tmp_path / "new", version="1.1")
    (new / "etc/mode").chmod(0o600)
    (new / "etc/content").write_text("y")
    (new / "etc/type").unlink()
    (new / "etc/type").mkdir()
    (new / "etc/link").unlink()
    (new / "etc/link").symlink_to("mode")
    (new / "etc/old-only").unlink()
    (new / "etc/new-only").write_text("")
    if os.geteuid() == 0:
        os.chown(new / "etc/same", 1, 1)
    try:  # like security.capability; not every file system (tmpfs before 6.6) has user.*
        os.setxattr(new / "etc/content", "user.fleetbake", b"x")
        content = "/etc/content (content, xattrs)"
    except OSError:
        content = "/etc/content (content)"
    assert compare.main([str(old), str(new), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["packages"] == ["a:arm64: 1.0 -> 1.1"]  # config-files is not installed
    assert result["only_old"] == ["/etc/old-only"]
    assert result["only_new"] == ["/etc/new-only"]
    changed = [
        content,
        "/etc/link (content)",
        "/etc/mode (mode)",
        "/etc/type (type, mode, content)",
        "/var/lib/dpkg/status (content)",
    ]
    if os.geteuid() == 0:
        changed.insert(3, "/etc/same (uid, gid)")
    assert result["changed"] == changed


def test_ignored_paths_and_files_only(
    compare: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    for root, text in ((old, "a"), (new, "b")):
        (root / "boot").mkdir(parents=True)
        (root / "boot/initrd.img-6.1").write_text(text)
    assert compare.main([str(old), str(new)]) == 2  # no dpkg database
    assert "no var/lib/dpkg/status" in capsys.readouterr().err
    assert compare.main([str(old), str(new), "--files-only"]) == 1
    assert "changed: /boot/initrd.img-6.1 (content)" in capsys.readouterr().out
    assert compare.main([str(old), str(new), "--files-only", "--ignore", "/boot/initrd*"]) == 0
