"""UEFI firmware from QEMU's firmware descriptors: priority by file name, overrides,
Secure Boot builds skipped, missing files skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imagefactory.host.firmware import find_uefi


def descriptor(d: Path, name: str, arch: str, code: Path, features: list[str] | None = None,
               kind: str = "uefi") -> None:  # fmt: skip
    code.write_bytes(b"code")
    vars_ = code.with_name(code.name + ".vars")
    vars_.write_bytes(b"vars")
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_text(json.dumps({
        "interface-types": [kind],
        "mapping": {"device": "flash", "executable": {"filename": str(code)},
                    "nvram-template": {"filename": str(vars_)}},
        "targets": [{"architecture": arch, "machines": ["virt-*"]}],
        "features": features or [],
    }))  # fmt: skip


def test_first_plain_descriptor_wins(tmp_path: Path) -> None:
    share = tmp_path / "share"
    descriptor(share, "40-secure.json", "aarch64", tmp_path / "s.fd", ["secure-boot"])
    descriptor(share, "50-smm.json", "aarch64", tmp_path / "m.fd", ["requires-smm"])
    descriptor(share, "60-plain.json", "aarch64", tmp_path / "p.fd")
    descriptor(share, "70-later.json", "aarch64", tmp_path / "l.fd")
    descriptor(share, "10-x86.json", "x86_64", tmp_path / "x.fd")
    descriptor(share, "20-bios.json", "aarch64", tmp_path / "b.fd", kind="bios")
    fw = find_uefi("aarch64", (share,))
    assert fw is not None
    assert fw.code == tmp_path / "p.fd"
    assert fw.vars_template == tmp_path / "p.fd.vars"
    assert fw.descriptor == share / "60-plain.json"


def test_later_directory_overrides_same_name(tmp_path: Path) -> None:
    descriptor(tmp_path / "share", "60-a.json", "x86_64", tmp_path / "share.fd")
    descriptor(tmp_path / "etc", "60-a.json", "x86_64", tmp_path / "etc.fd")
    fw = find_uefi("x86_64", (tmp_path / "share", tmp_path / "etc"))
    assert fw is not None and fw.code == tmp_path / "etc.fd"


def test_missing_files_and_bad_json_are_skipped(tmp_path: Path) -> None:
    share = tmp_path / "share"
    descriptor(share, "50-gone.json", "riscv64", tmp_path / "gone.fd")
    (tmp_path / "gone.fd").unlink()
    (share / "40-bad.json").write_text("{not json")
    assert find_uefi("riscv64", (share,)) is None
    assert find_uefi("riscv64", (tmp_path / "nowhere",)) is None


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_host_firmware_is_found(arch: str) -> None:
    if not Path("/usr/share/qemu/firmware").is_dir():
        pytest.skip("no QEMU firmware descriptors on this host")
    fw = find_uefi(arch)
    assert fw is not None and fw.code.is_file() and fw.vars_template.is_file()
