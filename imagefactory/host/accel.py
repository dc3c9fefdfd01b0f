"""Which QEMU accelerator really works for a target: KVM if a tiny guest boots with it,
otherwise TCG.

/dev/kvm can exist and open fine while guests cannot run (nested virtualization), so
the probe boots a one-sector guest under SeaBIOS that writes to QEMU's isa-debug-exit
port; QEMU then exits with (value << 1) | 1. Anything else (an error, a hang) means
KVM does not work. That guest is x86 only: a target runs the probe only if its row in
the target table sets `kvm_probe`, and any other target (or a foreign architecture) gets
TCG. The answer is cached per process and on disk for PROBE_TTL_S.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from functools import cache
from pathlib import Path

from imagefactory.paths import cache_root
from imagefactory.run import run, which
from imagefactory.targets import Target

PROBE_TTL_S = 600.0
PROBE_TIMEOUT_S = 20.0

# Boot sector: mov al, 0x21; out 0xf4, al; hlt  -> QEMU exits with (0x21 << 1) | 1.
_EXIT_VALUE = 0x21
PROBE_SECTOR = bytes([0xB0, _EXIT_VALUE, 0xE6, 0xF4, 0xF4]).ljust(510, b"\0") + b"\x55\xaa"
PROBE_EXIT_CODE = (_EXIT_VALUE << 1) | 1


def probe_argv(qemu: str, target: Target, disk: Path) -> list[str]:
    # The target's own machine and KVM CPU model: `-cpu host` is what fails on some hosts.
    return [
        qemu, "-accel", "kvm", "-machine", target.machine, "-cpu", target.cpu_kvm, "-m", "64",
        "-nodefaults", "-display", "none",
        "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-drive", f"file={disk},format=raw,if=ide",
    ]  # fmt: skip


def kvm_works(target: Target) -> tuple[bool, str]:
    """Boot the probe guest under KVM; (works, reason)."""
    if not target.is_native:
        return False, f"host is not {target.arch}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    if not target.kvm_probe:
        return False, f"no KVM probe guest for {target.arch} yet"
    qemu = which(target.qemu_binary)
    if qemu is None:
        return False, f"{target.qemu_binary} is not installed"
    with tempfile.TemporaryDirectory(prefix="imagefactory-kvm-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(PROBE_SECTOR)
        try:
            proc = run(
                probe_argv(str(qemu), target, disk),
                check=False,
                timeout=PROBE_TIMEOUT_S,
                die_with_parent=True,  # no guest outlives an interrupted probe
            )
        except subprocess.TimeoutExpired:
            return False, f"a KVM guest did not finish within {PROBE_TIMEOUT_S:.0f}s"
    if proc.returncode == PROBE_EXIT_CODE:
        return True, "a KVM guest booted"
    detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return False, f"a KVM guest did not boot: {detail}"


def _disk_cache() -> Path:
    return cache_root() / "accel.json"


def _load(arch: str) -> tuple[bool, str] | None:
    try:
        entry = json.loads(_disk_cache().read_text())[arch]
        if time.time() - float(entry["at"]) < PROBE_TTL_S:
            return bool(entry["kvm"]), str(entry["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _store(arch: str, works: bool, reason: str) -> None:
    path = _disk_cache()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[arch] = {"kvm": works, "reason": reason, "at": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except OSError:
        pass  # the disk cache is an optimisation only


@cache
def kvm_status(target: Target) -> tuple[bool, str]:
    """KVM usability for `target`, probed at most once per process and PROBE_TTL_S."""
    if "kvm" not in target.accelerators:
        return False, "the target does not use KVM"
    if (cached := _load(target.arch)) is not None:
        return cached
    works, reason = kvm_works(target)
    _store(target.arch, works, reason)
    return works, reason


def pick_accelerator(target: Target) -> str:
    """`kvm` if it really works for `target`, otherwise `tcg`."""
    return "kvm" if kvm_status(target)[0] else "tcg"
