"""The last steps of a base build, run from the host as mmdebstrap's last customize hook.

    python -m imagefactory.bake.finish ROOT native|foreign

1. py3compile's recorded calls, once (bake/pycompile.py);
2. the deferred tools (guestconfig.DEFERRED_TOOLS: update-initramfs, update-ca-certificates),
   once each. In a foreign root they run with the host's binaries of HOST_TOOL_PACKAGES
   in place of the target's where the versions match (bake/hosttools.py): mkinitramfs
   and the certificate loop start about a thousand short processes, each 0.07 s under
   qemu-user. mkinitramfs copies binaries into the initramfs, so afterwards every ELF file
   in it must be built for the target's machine; if one is not, the initramfs is made
   again with the target's own tools.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from imagefactory.bake import guestconfig, hosttools, initramfs, pycompile
from imagefactory.run import CommandError

HOST_TOOL_PACKAGES = ("dash", "coreutils", "sed", "grep", "findutils")
"""Packages whose binaries the deferred tools start most; none is copied into an initramfs
(its `cp`, `ln`, `sh`... come from klibc-utils)."""

REFERENCE_BINARY = "/usr/bin/dpkg"
"""A target binary that never has a stand-in: its ELF machine is the target's."""


def target_machine(root: Path) -> int:
    path = hosttools.target_file(root, REFERENCE_BINARY)
    if path is None:
        raise ValueError(f"{REFERENCE_BINARY} in the root filesystem is not a regular file")
    with path.open("rb") as binary:
        machine = initramfs.elf_machine(binary.read(64))
    if machine is None:
        raise ValueError(f"{REFERENCE_BINARY} in the root filesystem is not an ELF file")
    return machine


def wrong_initramfs(root: Path, machine: int) -> list[str]:
    """Files of the root's initramfs images that are ELF for another machine."""
    images = (
        hosttools.target_file(root, f"/boot/{p.name}") for p in root.glob("boot/initrd.img-*")
    )
    return [
        f"{image.name}: {name}"
        for image in sorted(i for i in images if i is not None)
        for name in initramfs.foreign_elves(image, machine)
    ]


def deferred_tools(root: Path, foreign: bool) -> str:
    """Run each deferred tool's command once; says how."""
    command = "set -e\n" + "\n".join(guestconfig.DEFERRED_TOOLS.values()) + "\n"
    if not foreign:
        hosttools.run_in_chroot(root, command)
        return "deferred tools run in the chroot (a native target)"
    binds, reasons = hosttools.tool_binds(root, HOST_TOOL_PACKAGES)
    probe = ["/bin/sh", "-c", ":"]
    if not binds or not hosttools.run_native(root, binds, probe, command):
        hosttools.run_in_chroot(root, command)
        return f"deferred tools run in the chroot ({'; '.join(reasons) or 'the probe failed'})"
    if wrong := wrong_initramfs(root, target_machine(root)):
        hosttools.run_in_chroot(root, "update-initramfs -u -k all")
        return f"initramfs made again in the chroot: a host binary was copied in ({wrong[0]})"
    return f"deferred tools run with {hosttools.summary(binds, reasons)}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in ("native", "foreign"):
        print("usage: python -m imagefactory.bake.finish ROOT native|foreign", file=sys.stderr)
        return 2
    root, foreign = Path(argv[0]), argv[1] == "foreign"
    try:
        print(f"I: fleetbake: {pycompile.replay(root, foreign)}", flush=True)
        print(f"I: fleetbake: {deferred_tools(root, foreign)}", flush=True)
    except (CommandError, ValueError, OSError, struct.error) as exc:
        print(f"E: fleetbake: finishing the root filesystem failed: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
