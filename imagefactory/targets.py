"""The table of build targets: one frozen row per target, and lookups derived from it.

Every per-architecture fact is a field of the row, and the rest of the code reads those
fields rather than testing the architecture's name (the KVM probe, for one, runs only
where `kvm_probe` is set). The GRUB platforms in `grub_platforms` are keys of two small
tables: `bake/bootdisk.py` names each EFI platform's loader file, `bake/guestconfig.py`
adds per-platform GRUB modules. So adding a target (say riscv64-linux) means adding one
row here, its firmware package on the host, and, for an EFI platform not in
`bootdisk.EFI_LOADER_NAMES` yet, its loader's file name there.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field

from imagefactory.errors import die


@dataclass(frozen=True)
class Target:
    name: str
    """The user-facing name, `<arch>-<os>`."""
    arch: str
    """Architecture as QEMU and `uname -m` spell it; also the firmware descriptors' name."""
    debian_arch: str
    """Architecture as Debian (dpkg, mmdebstrap) spells it."""
    qemu_binary: str
    """The system emulator that boots this target."""
    qemu_package: str
    """The Debian package that provides `qemu_binary`."""
    machine: str
    """QEMU machine type (`-machine`)."""
    cpu_kvm: str
    """CPU model when running under KVM."""
    cpu_tcg: str
    """CPU model when running under TCG (software emulation)."""
    firmware: str
    """`bios` (SeaBIOS, QEMU's default) or `uefi` (found via QEMU firmware descriptors)."""
    firmware_package: str
    """The Debian package that ships the UEFI firmware for this architecture."""
    console: str
    """The guest's serial console device, for `console=` on the kernel command line."""
    accelerators: tuple[str, ...]
    """Accelerators in order of preference; the first that really works is used."""
    kernel_package: str
    """The Debian kernel package baked into the base image."""
    bootloader_packages: tuple[str, ...]
    """GRUB packages that make the disk boot on its own, without `-kernel`."""
    disk_size: str = "4G"
    """Default virtual disk size of a baked image."""
    memory_mib: int = 1024
    """Default guest memory."""
    extra_qemu_args: tuple[str, ...] = field(default_factory=tuple)
    """Arguments this target always needs, e.g. `-boot strict=off` on aarch64."""
    grub_platforms: tuple[str, ...] = ()
    """GRUB platforms written onto the disk (`i386-pc` = BIOS, `*-efi` = UEFI removable path)."""
    initramfs_modules: tuple[str, ...] = ()
    """Kernel modules for the trimmed (`MODULES=list`) initramfs, beyond the common list."""
    kvm_probe: bool = False
    """Whether `host/accel.py`'s probe guest runs on this target's machine: it is a BIOS
    boot sector on an IDE disk that exits through the isa-debug-exit device, so x86 only.
    Without it, the target never uses KVM (`imagefactory doctor` says why)."""

    @property
    def is_native(self) -> bool:
        """True when the host runs this architecture, so KVM and chroots work natively."""
        return host_arch() == self.arch


TARGETS: tuple[Target, ...] = (
    Target(
        name="x86_64-linux",
        arch="x86_64",
        debian_arch="amd64",
        qemu_binary="qemu-system-x86_64",
        qemu_package="qemu-system-x86",
        machine="q35",
        cpu_kvm="host",
        cpu_tcg="max",
        firmware="bios",
        firmware_package="ovmf",
        console="ttyS0",
        accelerators=("kvm", "tcg"),
        kernel_package="linux-image-cloud-amd64",
        bootloader_packages=("grub-pc-bin", "grub-efi-amd64-bin"),
        grub_platforms=("i386-pc", "x86_64-efi"),
        initramfs_modules=("ata_piix", "ahci"),
        kvm_probe=True,
    ),
    Target(
        name="aarch64-linux",
        arch="aarch64",
        debian_arch="arm64",
        qemu_binary="qemu-system-aarch64",
        qemu_package="qemu-system-arm",
        machine="virt",
        cpu_kvm="host",
        cpu_tcg="max,pauth-impdef=on",
        firmware="uefi",
        firmware_package="qemu-efi-aarch64",
        console="ttyAMA0",
        accelerators=("kvm", "tcg"),
        kernel_package="linux-image-arm64",
        bootloader_packages=("grub-efi-arm64-bin",),
        extra_qemu_args=("-boot", "strict=off"),
        grub_platforms=("arm64-efi",),
        initramfs_modules=("virtio_mmio",),
    ),
)

_BY_NAME = {t.name: t for t in TARGETS}


def host_arch() -> str:
    """The host's architecture, spelled as in the table (`uname -m`)."""
    return platform.machine()


def target_names() -> list[str]:
    return [t.name for t in TARGETS]


def get_target(name: str) -> Target:
    """Look a target up by name; an unknown name is a user error that lists the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise die(
            f"unknown target {name!r}", hint=f"valid targets: {', '.join(target_names())}"
        ) from None
