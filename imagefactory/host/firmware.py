"""UEFI firmware, found through QEMU's firmware descriptors rather than hard-coded paths.

QEMU's firmware interop spec (docs/interop/firmware.json) puts one JSON descriptor per
firmware build in /usr/share/qemu/firmware, overridable from /etc/qemu/firmware and
~/.config/qemu/firmware (same file name: the later directory wins). Descriptors are
considered in file-name order, which is their priority.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DESCRIPTOR_DIRS = (
    Path("/usr/share/qemu/firmware"),
    Path("/etc/qemu/firmware"),
    Path.home() / ".config/qemu/firmware",
)

# Unsigned GRUB cannot boot with Secure Boot keys enrolled, and SMM-only builds need
# machine options Packer 1.6.6 cannot set: skip both.
UNWANTED_FEATURES = frozenset({"secure-boot", "enrolled-keys", "requires-smm"})


@dataclass(frozen=True)
class Firmware:
    code: Path
    """Read-only firmware code (pflash unit 0, or `-bios`)."""
    vars_template: Path
    """Template of the writable variable store; copy it per VM (pflash unit 1)."""
    descriptor: Path
    """The descriptor this was read from."""


def descriptors(dirs: tuple[Path, ...] = DESCRIPTOR_DIRS) -> list[Path]:
    by_name: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for path in d.glob("*.json"):
                by_name[path.name] = path
    return [by_name[name] for name in sorted(by_name)]


def _usable(doc: dict[str, Any], arch: str) -> tuple[Path, Path] | None:
    """(code, vars template) if the descriptor is plain UEFI for `arch`, installed."""
    if "uefi" not in doc.get("interface-types", []):
        return None
    if UNWANTED_FEATURES & set(doc.get("features", [])):
        return None
    if arch not in {t.get("architecture") for t in doc.get("targets", [])}:
        return None
    mapping = doc.get("mapping", {})
    if mapping.get("device") != "flash":
        return None
    try:
        code = Path(mapping["executable"]["filename"])
        template = Path(mapping["nvram-template"]["filename"])
    except (KeyError, TypeError):
        return None
    if not (code.is_file() and template.is_file()):
        return None
    return code, template


def find_uefi(arch: str, dirs: tuple[Path, ...] = DESCRIPTOR_DIRS) -> Firmware | None:
    """The highest-priority plain (no Secure Boot) UEFI build for `arch`, or None."""
    for path in descriptors(dirs):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and (found := _usable(doc, arch)):
            return Firmware(*found, descriptor=path)
    return None
