"""Host checks: every tool a bake needs, and the exact Debian package that provides it.

`checks()` is the data behind `imagefactory doctor`, `imagefactory targets` and the
pre-flight of `imagefactory bake`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from imagefactory.errors import die
from imagefactory.host.accel import kvm_status
from imagefactory.host.firmware import find_uefi
from imagefactory.run import run, which
from imagefactory.targets import TARGETS, Target

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    package: str | None = None
    """The Debian package that fixes a failed check (None: nothing to install)."""
    required: bool = True
    """False for checks that only change speed (KVM)."""


# program -> Debian package, needed to build any image.
BUILD_TOOLS = (
    ("packer", "packer"),
    ("qemu-img", "qemu-utils"),
    ("mmdebstrap", "mmdebstrap"),
    ("xorriso", "xorriso"),
    ("mkfs.ext4", "e2fsprogs"),
    ("mkfs.fat", "dosfstools"),
    ("mcopy", "mtools"),
    ("sfdisk", "fdisk"),
    ("ssh-keygen", "openssh-client"),
)

# Container images (`bake --format oci`) and container nodes (`boot --runtime`) need
# these; the doctor lists them, but a host that bakes only VM images may lack them.
OCI_TOOLS = (("skopeo", "skopeo"),)
RUNTIMES = {"runc": "runc", "podman": "podman", "docker": "docker.io"}
"""Container runtime -> the Debian package that provides it."""

# Bare-metal installers (`bake --format installer`) need dpkg-deb; lintian only checks
# the package (its tests run it).
INSTALLER_TOOLS = (("dpkg-deb", "dpkg"), ("lintian", "lintian"))


def tool_check(program: str, package: str) -> Check:
    path = which(program)
    if path is None:
        return Check(program, False, "not found on PATH", package)
    if program == "packer":
        out = run(["packer", "version"], check=False, env={"CHECKPOINT_DISABLE": "1"}).stdout
        return Check(program, True, (out.splitlines() or ["?"])[0], package)
    return Check(program, True, str(path), package)


def binfmt_check(target: Target) -> Check:
    name = f"binfmt {target.arch}"
    if target.is_native:
        return Check(name, True, "native architecture", None)
    entry = BINFMT_DIR / f"qemu-{target.arch}"
    if which("arch-test") is None:  # mmdebstrap needs it for foreign architectures
        return Check(name, False, "arch-test not found", "arch-test")
    if entry.is_file() and entry.read_text().startswith("enabled"):
        return Check(name, True, str(entry), "qemu-user-static")
    detail = "binfmt_misc not mounted" if not BINFMT_DIR.joinpath("status").exists() else "no entry"
    return Check(name, False, f"{detail} (run scripts/setup-host.sh)", "qemu-user-static")


def firmware_check(target: Target) -> Check:
    name = f"uefi {target.arch}"
    fw = find_uefi(target.arch)
    if fw is None:
        return Check(
            name, target.firmware != "uefi", "no firmware descriptor", target.firmware_package
        )
    return Check(name, True, f"{fw.code} ({fw.descriptor.name})", target.firmware_package)


def target_checks(target: Target) -> list[Check]:
    qemu = which(target.qemu_binary)
    kvm, reason = kvm_status(target)
    return [
        Check(target.qemu_binary, qemu is not None, str(qemu or "not found"), target.qemu_package),
        firmware_check(target),
        binfmt_check(target),
        Check(f"kvm {target.arch}", kvm, reason + ("" if kvm else "; using TCG"), None, False),
    ]


def container_checks() -> list[Check]:
    tools = [*OCI_TOOLS, *RUNTIMES.items()]
    return [replace(tool_check(program, package), required=False) for program, package in tools]


def installer_checks() -> list[Check]:
    found = [tool_check(program, package) for program, package in INSTALLER_TOOLS]
    return [Check(c.name, c.ok, c.detail, c.package, required=False) for c in found]


def require_installer() -> None:
    """Stop, saying why, if this host cannot build the bare-metal installer's package."""
    check = tool_check(*INSTALLER_TOOLS[0])
    if not check.ok:
        raise die(
            "cannot bake an installer: dpkg-deb is missing",
            hint=f"apt install {check.package} (see `imagefactory doctor`)",
        )


def checks(targets: tuple[Target, ...] = TARGETS) -> list[Check]:
    found = [tool_check(program, package) for program, package in BUILD_TOOLS]
    found.extend(container_checks())
    found.extend(installer_checks())
    for target in targets:
        found.extend(target_checks(target))
    return found


def problems(found: list[Check]) -> list[Check]:
    return [c for c in found if c.required and not c.ok]


def can_build(target: Target) -> bool:
    return not problems(checks((target,)))


def require(target: Target) -> None:
    """Stop with the doctor's hint if a tool the bake of `target` needs is missing."""
    missing = problems(checks((target,)))
    if missing:
        names = ", ".join(f"{c.name} (apt install {c.package})" for c in missing)
        raise die(
            f"missing host tools for {target.name}: {names}", hint="run `imagefactory doctor`"
        )


def require_oci(target: Target) -> None:
    """Stop, saying why, if this host cannot bake a container image of `target`."""
    found = [tool_check(p, pkg) for p, pkg in (*OCI_TOOLS, ("mmdebstrap", "mmdebstrap"))]
    missing = [c for c in [*found, binfmt_check(target)] if not c.ok]
    if missing:
        names = ", ".join(f"{c.name}: {c.detail} (apt install {c.package})" for c in missing)
        raise die(
            f"cannot bake a container image of {target.name}: {names}",
            hint="run `imagefactory doctor`",
        )


def require_runtime(runtime: str) -> str:
    """The path of a container runtime, or a user error naming its Debian package."""
    check = tool_check(runtime, RUNTIMES[runtime])
    if not check.ok:
        raise die(
            f"container runtime {runtime} is not installed",
            hint=f"apt install {check.package} (see `imagefactory doctor`)",
        )
    return check.detail
