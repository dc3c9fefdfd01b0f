"""The host's binaries while a foreign base's packages install (two mmdebstrap hooks).

    python -m imagefactory.bake.hostinstall bind ROOT STATE     the last essential hook
    python -m imagefactory.bake.hostinstall unbind ROOT STATE   the first customize hook

After the essential set, about 190 packages unpack and configure, and their maintainer
scripts start thousands of short processes: `sh`, `sed`, `grep`, `cp`, and Perl for
debconf and deb-systemd-helper, each 0.07 s or more to start under qemu-user. The host's
binaries of INSTALL_TOOL_PACKAGES stand in for the target's wherever the two are the very
same Debian version (bake/hosttools.py finds them, copies them with a relocated loader and
binds them read-only), from the end of the essential set until the customize hooks. No
later package replaces those files: the essential set installed them from the same
archive at the same versions. dpkg itself, apt and everything else stay the target's.

Perl sees the modules the target's own Perl would: perl-base's (the same version on both
sides), the target's arch-independent ones, and, from the host's other arch-specific
directories, only those of a `libperl5.X` the target has at the same version; the rest are
hidden behind an empty directory. A target with arch-specific Perl modules of its own
(`/usr/lib/*/perl5`) keeps its Perl emulated.

mmdebstrap runs in a mount namespace of its own (base.mmdebstrap_argv), so the mounts
end with it even when the build fails; `unbind` removes them, and the mount points made for
them, before the root is customized. STATE (a directory outside the root) holds the
relocated copies and the list of what `bind` mounted and made. If anything in `bind`
fails, a bind or a probe among them, it undoes what it did and the packages install
emulated, as before: slower, the same result. Either way the hook says what happened in
one `I:` line. A package that did replace a bound file would fail loudly (dpkg cannot
rename onto a mount point: "Device or resource busy"), never install something else.
"""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

from imagefactory.bake import hosttools
from imagefactory.run import CommandError, run

INSTALL_TOOL_PACKAGES = (
    "dash", "bash", "coreutils", "sed", "grep", "findutils", "mawk", "diffutils",
    "debianutils", "perl-base",
)  # fmt: skip
"""What maintainer scripts start most: the shells and their tools, and Perl (debconf's
frontend, deb-systemd-helper, update-rc.d)."""

PROBES = {
    "/usr/bin/dash": ["/bin/sh", "-c", ":"],
    "/usr/bin/true": ["/usr/bin/true"],
    "/usr/bin/sed": ["/usr/bin/sed", "--version"],
    "/usr/bin/grep": ["/usr/bin/grep", "--version"],
    "/usr/bin/find": ["/usr/bin/find", "--version"],
    "/usr/bin/perl": ["/usr/bin/perl", "-MPOSIX", "-e", "1"],  # and its XS modules load
}
"""Each bound binary here must start in the chroot, and at least one must be bound, or
none of the host's binaries is used: the copies share the loader, the library directory
and STATE's file system, so one that starts shows the others can."""

FAILURES = (CommandError, OSError, ValueError, struct.error)
"""What makes `bind` fall back to emulation (ValueError: a binary whose loader path does
not fit; struct.error: a truncated ELF file)."""

_RECORD = "mounts.json"
_LIBPERL = re.compile(r"libperl5\.\d+")


def _record(state: Path, mounted: list[str], made: list[str]) -> None:
    (state / _RECORD).write_text(json.dumps({"mounted": mounted, "made": made}) + "\n")


def _inside(root: Path, guest: str) -> Path:
    """`guest` in the root, checked again: ~190 packages' scripts ran since `bind`, and
    nothing on the host may be unmounted or removed through a link they left."""
    path = hosttools.inside(root, guest)
    if path is None:
        raise ValueError(f"{guest} is no longer a plain path inside the root; left as it is")
    return path


def unbind(root: Path, state: Path) -> int:
    """Unmount what `bind` mounted (last first) and remove the mount points it made; how
    many mounts there were."""
    record = state / _RECORD
    if not record.exists():
        return 0
    data = json.loads(record.read_text())
    for guest in reversed(data["mounted"]):
        run(["umount", "--lazy", str(_inside(root, guest))])
    for guest in reversed(data["made"]):
        hosttools.remove_mountpoint(_inside(root, guest))
    record.unlink()
    return len(data["mounted"])


def perl_view(root: Path, binds: list[hosttools.Bind], empty: Path) -> list[hosttools.Bind]:
    """The binds that hide the host's arch-specific Perl modules the target's Perl would
    not see (see above), behind `empty`; ValueError if the host's Perl cannot stand in."""
    if any(root.glob("usr/lib/*/perl5/*")):
        raise ValueError("the target has Perl modules built for its own machine")
    status = hosttools.target_file(root, "/var/lib/dpkg/status")
    text = status.read_text(encoding="utf-8") if status is not None else ""
    libperls = [f["Package"] for f in hosttools.installed(text) if _LIBPERL.fullmatch(f["Package"])]
    same, reasons = hosttools.same_packages(root, tuple(libperls))
    if reasons:
        raise ValueError("; ".join(reasons))
    library = next(b for b in binds if b.host.is_dir()).guest
    hidden = ["perl5"] + ([] if same else ["perl"])
    return [
        hosttools.Bind(empty, f"{library}/{name}")
        for name in hidden
        if Path(library, name).is_dir()
    ]


def _binds(root: Path, state: Path) -> tuple[list[hosttools.Bind], list[str]]:
    """What to bind (the host's copies made in STATE), and why the rest stays emulated."""
    binds, reasons = hosttools.tool_binds(root, INSTALL_TOOL_PACKAGES)
    if not binds:
        return [], reasons
    if "/usr/bin/perl" in {b.guest for b in binds}:
        empty = state / "empty"
        empty.mkdir(parents=True, exist_ok=True)
        try:
            binds += perl_view(root, binds, empty)
        except ValueError as exc:
            perl_base = hosttools.package_tools(
                root, "perl-base", hosttools.dpkg_list(root, "perl-base")
            )
            binds = [b for b in binds if b not in perl_base]
            reasons.append(f"perl: {exc}")
    return hosttools.relocated(binds, state), reasons


def bind(root: Path, state: Path) -> str:
    """Bind the host's binaries into the root for the rest of the installation; says how
    many, or why none."""
    mounted: list[str] = []
    made: list[str] = []
    try:
        state.mkdir(parents=True, exist_ok=True)
        mounts, reasons = _binds(root, state)
        if not mounts:
            return f"the packages install emulated ({'; '.join(reasons)})"
        for mount in mounts:  # recorded one by one: a failure still undoes what was done
            if hosttools.mountpoint(root, mount) is not None:
                made.append(mount.guest)
            _record(state, mounted, made)
            target = str(root / mount.guest.lstrip("/"))
            run(["mount", "--bind", "-o", "ro", str(mount.host), target])
            mounted.append(mount.guest)
            _record(state, mounted, made)
        probes = [probe for binary, probe in PROBES.items() if binary in mounted]
        if not probes:
            raise ValueError("none of the bound binaries has a probe")
        for probe in probes:
            run(["chroot", str(root), *probe])
    except FAILURES as exc:
        unbind(root, state)
        return f"the packages install emulated (the host's binaries do not work there: {exc})"
    return f"the packages install with {hosttools.summary(mounts, reasons)}"


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] not in ("bind", "unbind"):
        print("usage: python -m imagefactory.bake.hostinstall bind|unbind ROOT STATE",
              file=sys.stderr)  # fmt: skip
        return 2
    action, root, state = argv[0], Path(argv[1]), Path(argv[2])
    try:
        if action == "bind":
            print(f"I: fleetbake: {bind(root, state)}", flush=True)
        else:
            print(
                f"I: fleetbake: {unbind(root, state)} binds of the host's files removed", flush=True
            )
    except FAILURES as exc:
        print(f"E: fleetbake: {action}ing the host's binaries failed: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
