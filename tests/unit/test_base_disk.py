"""bootdisk.assemble with the real tools (sfdisk, mkfs.ext4 -d, mkfs.fat, mtools), no loop
mounts: the partition table, the root filesystem and the ESP are read back."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from imagefactory.bake import bootdisk

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sfdisk", "mkfs.ext4", "mkfs.fat", "mcopy", "debugfs")),
    reason="needs fdisk, e2fsprogs, dosfstools, mtools",
)

UUID = "3b0b2a5e-63a6-4b0d-a0c4-3f4f8a4a2a11"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    rootfs = tmp_path / "rootfs"
    (rootfs / "boot/grub").mkdir(parents=True)
    (rootfs / "boot/grub/grub.cfg").write_text("set timeout=0\n")
    grub = tmp_path / "grub"
    grub.mkdir()
    (grub / "boot.img").write_bytes(b"\xeb\x63" + b"\x11" * 510)
    (grub / "core.img").write_bytes(b"\x22" * 1500)
    (grub / "x86_64-efi.efi").write_bytes(b"MZ-efi-loader")
    path = tmp_path / "disk.raw"
    bootdisk.assemble(path, bootdisk.Layout(64), rootfs, UUID, grub, ("i386-pc", "x86_64-efi"))
    return path


def test_partition_table(disk: Path) -> None:
    out = subprocess.run(["sfdisk", "--json", disk], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)["partitiontable"]
    assert table["label"] == "gpt"
    layout = bootdisk.Layout(64)
    parts = [(p["start"], p["size"], p["type"]) for p in table["partitions"]]
    assert parts == [
        (layout.bios_start, layout.bios_sectors, bootdisk.BIOS_BOOT_TYPE),
        (layout.esp_start, layout.esp_sectors, bootdisk.ESP_TYPE),
        (layout.root_start, layout.root_sectors, bootdisk.LINUX_TYPE),
    ]


def test_root_filesystem_holds_the_tree(disk: Path) -> None:
    spec = f"{disk}?offset={bootdisk.Layout(64).root_start * 512}"
    cat = subprocess.run(
        ["debugfs", "-R", "cat /boot/grub/grub.cfg", spec], capture_output=True, check=True
    )
    assert cat.stdout == b"set timeout=0\n"
    stats = subprocess.run(["debugfs", "-R", "stats", spec], capture_output=True, text=True)
    assert UUID in stats.stdout
    assert "orphan_file" not in stats.stdout  # GRUB 2.06 cannot read it


def test_esp_holds_the_uefi_loader(disk: Path) -> None:
    image = bootdisk.mtools_image(disk, bootdisk.Layout(64))
    out = subprocess.run(
        ["mtype", "-i", image, "::/EFI/BOOT/BOOTX64.EFI"],
        capture_output=True, check=True, env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.stdout == b"MZ-efi-loader"


def test_bios_stages_are_patched_in(disk: Path) -> None:
    data = disk.read_bytes()[: 4096 * 512]
    assert data[:2] == b"\xeb\x63"
    assert struct.unpack_from("<Q", data, 0x5C)[0] == 2048
    assert data[510:512] == b"\x55\xaa"  # the protective MBR survived
    core = data[2048 * 512 : 2048 * 512 + 1536]
    assert struct.unpack_from("<QHH", core, 500) == (2049, 2, 0x820)
