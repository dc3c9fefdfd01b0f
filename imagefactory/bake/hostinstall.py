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

mmdebstrap runs in a mount namespace of its own (base.mmdebstrap_argv), so the mounts
end with it even when the build fails; `unbind` removes them, and the mount points made for
them, before the root is customized. STATE (a directory outside the root) holds the
relocated copies and the list of what `bind` mounted and made. If a bind or the probe
fails, `bind` undoes what it did and the packages install emulated, as before: slower,
the same result. Either way the hook says what happened in one `I:` line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from imagefactory.bake import hosttools
from imagefactory.run import CommandError, run

INSTALL_TOOL_PACKAGES = (
    "dash", "bash", "coreutils", "sed", "grep", "findutils", "mawk", "diffutils",
    "debianutils", "perl-base",
)  # fmt: skip
"""What maintainer scripts start most: the shells and their tools, and Perl (debconf's
frontend, deb-systemd-helper, update-rc.d). Perl's modules come along: the host's library
directory is bound whole, and the arch-independent ones are the target's."""

PROBES = {
    "/usr/bin/dash": ["/bin/sh", "-c", ":"],
    "/usr/bin/perl": ["/usr/bin/perl", "-MPOSIX", "-e", "1"],  # and its XS modules load
}
"""A host binary that is bound must start in the chroot, or none of them is used."""

_RECORD = "mounts.json"


def _record(state: Path, mounted: list[str], made: list[Path]) -> None:
    data = {"mounted": mounted, "made": [str(p) for p in made]}
    (state / _RECORD).write_text(json.dumps(data) + "\n")


def unbind(root: Path, state: Path) -> int:
    """Unmount what `bind` mounted (last first) and remove the mount points it made; how
    many mounts there were."""
    record = state / _RECORD
    if not record.exists():
        return 0
    data = json.loads(record.read_text())
    for guest in reversed(data["mounted"]):
        run(["umount", "--lazy", str(root / guest.lstrip("/"))])
    for made in reversed(data["made"]):
        path = Path(made)
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    record.unlink()
    return len(data["mounted"])


def bind(root: Path, state: Path) -> str:
    """Bind the host's binaries into the root for the rest of the installation; says how
    many, or why none."""
    binds, reasons = hosttools.tool_binds(root, INSTALL_TOOL_PACKAGES)
    if not binds:
        return f"the packages install emulated ({'; '.join(reasons)})"
    state.mkdir(parents=True, exist_ok=True)
    mounts = hosttools.relocated(binds, state)
    mounted: list[str] = []
    made: list[Path] = []
    try:
        for mount in mounts:  # recorded one by one: a failure still undoes what was done
            if (point := hosttools.mountpoint(root, mount)) is not None:
                made.append(point)
            _record(state, mounted, made)
            target = str(root / mount.guest.lstrip("/"))
            run(["mount", "--bind", "-o", "ro", str(mount.host), target])
            mounted.append(mount.guest)
            _record(state, mounted, made)
        for binary, probe in PROBES.items():
            if binary in mounted:
                run(["chroot", str(root), *probe])
    except (CommandError, OSError) as exc:
        unbind(root, state)
        return f"the packages install emulated (the host's binaries do not work there: {exc})"
    return f"the packages install with {hosttools.summary(binds, reasons)}"


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
            print(f"I: fleetbake: {unbind(root, state)} of the host's files unbound", flush=True)
    except (CommandError, ValueError, OSError) as exc:
        print(f"E: fleetbake: {action}ing the host's binaries failed: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
