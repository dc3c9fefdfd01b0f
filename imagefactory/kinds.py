"""The kinds of environment a device can run, as a table: each kind is baked in one store
format and reaches its device one way. Which kinds a device can have follows from the
targets (imagefactory/targets.py, by architecture) and the formats the services build.

    kind       format     reach (the device record's key)
    vm         qcow2      libvirt     a storage pool and a domain on a libvirt hypervisor
    container  oci        container   a container host that pulls from the registry
    baremetal  installer  ssh         `imagefactory install` over SSH
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

from imagefactory.targets import TARGETS, Target


@dataclass(frozen=True)
class Kind:
    name: str
    format: str
    """The `imagefactory bake --format` whose environment this kind runs."""
    reach: str
    """The key of the device record that says how to reach a device of this kind."""


KINDS: tuple[Kind, ...] = (
    Kind("vm", "qcow2", "libvirt"),
    Kind("container", "oci", "container"),
    Kind("baremetal", "installer", "ssh"),
)
KIND_NAMES: tuple[str, ...] = tuple(k.name for k in KINDS)
ARCHS: tuple[str, ...] = tuple(dict.fromkeys(t.arch for t in TARGETS))

_BY_NAME = {k.name: k for k in KINDS}


def get_kind(name: str) -> Kind:
    """The row of kind `name`; KeyError for an unknown one (names are checked on input)."""
    return _BY_NAME[name]


def targets_for(arch: str, kind: str, formats: Collection[str]) -> list[Target]:
    """The targets a device of `arch` can run as `kind`, when `formats` can be built."""
    if kind not in _BY_NAME or get_kind(kind).format not in formats:
        return []
    return [t for t in TARGETS if t.arch == arch]


def first_match(
    arch: str, kinds: Sequence[str], formats: Collection[str]
) -> tuple[Target, Kind] | None:
    """The first (target, kind) in the device's order of preference, or None."""
    for kind in kinds:
        for target in targets_for(arch, kind, formats):
            return target, get_kind(kind)
    return None


def supported(formats: Collection[str]) -> str:
    """What a device may be, in one line: `x86_64: vm, container; aarch64: vm`."""
    parts = []
    for arch in ARCHS:
        kinds = [k.name for k in KINDS if targets_for(arch, k.name, formats)]
        parts.append(f"{arch}: {', '.join(kinds) or 'nothing'}")
    return "; ".join(parts)
