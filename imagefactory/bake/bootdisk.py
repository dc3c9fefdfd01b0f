"""Turn a root filesystem directory into a self-booting raw disk, without loop mounts.

Layout (GPT, 512-byte sectors), the same on every architecture so that the root
filesystem is always partition 3:

    sector 0        protective MBR; on BIOS targets GRUB's boot.img (first 440 bytes)
    1 MiB   p1      BIOS boot partition (1 MiB): GRUB's core.img, found by boot.img
    2 MiB   p2      EFI system partition (FAT, 32 MiB): EFI/BOOT/BOOT<ARCH>.EFI
    34 MiB  p3      root filesystem (ext4, built with `mkfs.ext4 -d`), last so it can grow

The ext4 and FAT filesystems are written straight into the disk file at their offsets
(`mkfs.ext4 -E offset=`, `mkfs.fat --offset`, mtools `-i disk@@offset`), and GRUB's
BIOS stages are patched in with plain file writes, as `grub-bios-setup` would do.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from imagefactory.run import run

SECTOR = 512
MIB = 1024 * 1024

BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

# Removable-media file name UEFI firmware looks for, per GRUB EFI platform.
EFI_LOADER_NAMES = {
    "x86_64-efi": "BOOTX64.EFI",
    "arm64-efi": "BOOTAA64.EFI",
    "riscv64-efi": "BOOTRISCV64.EFI",
}

# Offsets inside GRUB's i386-pc boot.img (grub/include/grub/i386/pc/boot.h).
_KERNEL_SECTOR = 0x5C
_DRIVE_CHECK = 0x66
_MBR_CODE_END = 440  # the disk signature and partition table follow; keep them
_BLOCKLIST_SIZE = 12  # struct grub_boot_blocklist {u64 start; u16 len; u16 segment}
_KERNEL_SEGMENT = 0x800 + (SECTOR >> 4)


@dataclass(frozen=True)
class Layout:
    """Partition offsets of a base disk, in 512-byte sectors."""

    root_mib: int
    """Size of the root filesystem partition."""
    bios_start: int = 2048
    bios_sectors: int = 2048
    esp_start: int = 4096
    esp_sectors: int = 32 * 2048

    @property
    def root_start(self) -> int:
        return self.esp_start + self.esp_sectors

    @property
    def root_sectors(self) -> int:
        return self.root_mib * 2048

    @property
    def total_bytes(self) -> int:
        # 1 MiB after the root partition holds the backup GPT.
        return (self.root_start + self.root_sectors + 2048) * SECTOR

    def sfdisk_script(self) -> str:
        return (
            "label: gpt\nunit: sectors\n"
            f"start={self.bios_start}, size={self.bios_sectors}, type={BIOS_BOOT_TYPE}, name=bios\n"
            f"start={self.esp_start}, size={self.esp_sectors}, type={ESP_TYPE}, name=esp\n"
            f"start={self.root_start}, size={self.root_sectors}, type={LINUX_TYPE}, name=root\n"
        )


def mkfs_ext4_argv(disk: Path, layout: Layout, rootfs: Path, uuid: str) -> list[str]:
    # GRUB 2.06 cannot read ext4 with orphan_file or metadata_csum_seed (e2fsprogs 1.47).
    return [
        "mkfs.ext4", "-q", "-F", "-L", "root", "-U", uuid,
        "-O", "^orphan_file,^metadata_csum_seed",
        "-E", f"offset={layout.root_start * SECTOR},root_owner=0:0",
        "-d", str(rootfs), str(disk), f"{layout.root_mib}M",
    ]  # fmt: skip


def mkfs_esp_argv(disk: Path, layout: Layout) -> list[str]:
    return [
        "mkfs.fat", "-F", "16", "-n", "ESP", f"--offset={layout.esp_start}",
        str(disk), str(layout.esp_sectors * SECTOR // 1024),
    ]  # fmt: skip


def mtools_image(disk: Path, layout: Layout) -> str:
    return f"{disk}@@{layout.esp_start * SECTOR}"


def patch_boot_img(boot_img: bytes, mbr: bytes, core_sector: int) -> bytes:
    """GRUB's boot.img code in front of the existing MBR's signature and partition table,
    pointed at core.img's first sector, with the hard-disk drive check turned off."""
    if len(boot_img) != SECTOR or len(mbr) != SECTOR:
        raise ValueError("boot.img and the MBR must be one sector each")
    out = bytearray(mbr)
    out[:_MBR_CODE_END] = boot_img[:_MBR_CODE_END]
    struct.pack_into("<Q", out, _KERNEL_SECTOR, core_sector)
    out[_DRIVE_CHECK : _DRIVE_CHECK + 2] = b"\x90\x90"
    return bytes(out)


def patch_core_img(core_img: bytes, core_sector: int) -> bytes:
    """Fill diskboot's block list: the rest of core.img follows its first sector."""
    sectors = -(-len(core_img) // SECTOR)
    out = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    at = SECTOR - _BLOCKLIST_SIZE
    struct.pack_into("<QHH", out, at, core_sector + 1, sectors - 1, _KERNEL_SEGMENT)
    return bytes(out)


def _write_at(disk: Path, offset: int, data: bytes) -> None:
    fd = os.open(disk, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def install_bios_grub(disk: Path, layout: Layout, boot_img: bytes, core_img: bytes) -> None:
    core = patch_core_img(core_img, layout.bios_start)
    if len(core) > layout.bios_sectors * SECTOR:
        raise ValueError(f"core.img ({len(core)} bytes) does not fit the BIOS boot partition")
    with disk.open("rb") as f:
        mbr = f.read(SECTOR)
    _write_at(disk, 0, patch_boot_img(boot_img, mbr, layout.bios_start))
    _write_at(disk, layout.bios_start * SECTOR, core)


def install_efi_grub(disk: Path, layout: Layout, loaders: dict[str, Path]) -> None:
    """Copy EFI loaders (file name -> path) to EFI/BOOT on the ESP."""
    image = mtools_image(disk, layout)
    env = {"MTOOLS_SKIP_CHECK": "1"}
    run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT"], env=env)
    for name, path in sorted(loaders.items()):
        run(["mcopy", "-i", image, str(path), f"::/EFI/BOOT/{name}"], env=env)


def assemble(
    disk: Path, layout: Layout, rootfs: Path, uuid: str, grub_dir: Path, platforms: tuple[str, ...]
) -> None:
    """Write a bootable raw disk from `rootfs`; GRUB images come from `grub_dir`
    (`boot.img` + `core.img` for i386-pc, `<platform>.efi` for EFI platforms)."""
    with disk.open("wb") as f:
        f.truncate(layout.total_bytes)
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)],
        input=layout.sfdisk_script())  # fmt: skip
    run(mkfs_esp_argv(disk, layout))
    run(mkfs_ext4_argv(disk, layout, rootfs, uuid))
    loaders: dict[str, Path] = {}
    for platform in platforms:
        if platform == "i386-pc":
            boot = (grub_dir / "boot.img").read_bytes()
            install_bios_grub(disk, layout, boot, (grub_dir / "core.img").read_bytes())
        else:
            loaders[EFI_LOADER_NAMES[platform]] = grub_dir / f"{platform}.efi"
    if loaders:
        install_efi_grub(disk, layout, loaders)
