"""The host's own binaries in a foreign chroot, in place of the target's identical ones.

Under qemu-user every process the chroot starts costs about 0.07 s before it does any
work (Python 0.34 s); a base build's last steps start thousands. When the host has a
package at the very same Debian version as the target, its binaries do the same thing,
so they can stand in for the target's while a command runs:

    unshare --mount (private)
      mount --bind -o ro /usr/lib/<host multiarch>  onto a new, empty directory
      mount --bind -o ro <the host's ld.so>          onto a new, empty LOADER file
      mount --bind -o ro <copy of /usr/bin/sed ...>  onto the target's /usr/bin/sed ...
      chroot ROOT PROBE                              the host's binaries start there
      exec chroot ROOT /bin/sh -c COMMAND            (a failed bind or probe: nothing run)

The copies name LOADER as their ELF interpreter (PT_INTERP), so the root never gets a
top-level /lib64, which mkinitramfs would copy into the initramfs (`for d in /lib*`).
Nothing is written into the root filesystem: the mounts end with the namespace, and the
directory and file made for them are removed. Binaries of other packages (or versions)
stay the target's, emulated, so a command still works if a tool is missing; it is only
slower. What a command copies into the target (mkinitramfs copies binaries) must not be
one of the stand-ins: callers check that (bake/initramfs.py).
"""

from __future__ import annotations

import posixpath
import shlex
import stat
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagefactory.run import CommandError, run

LOADER = "/tmp/fleetbake-ld.so"
"""Where the host's dynamic loader appears in the chroot: short enough for any PT_INTERP
(`/lib64/ld-linux-x86-64.so.2` is 27 bytes), and not a directory mkinitramfs looks at."""

_PT_INTERP = 3

_MERGED = {"/bin/": "/usr/bin/", "/sbin/": "/usr/sbin/", "/lib/": "/usr/lib/"}
_TOOL_DIRS = ("/usr/bin", "/usr/sbin")
MACHINE_TOOLS = frozenset({"/usr/bin/uname", "/usr/bin/arch"})
"""Tools whose answer is the machine they run on (qemu-user says the target's): never
the host's."""


@dataclass(frozen=True)
class Bind:
    """A host path bind-mounted at a guest path."""

    host: Path
    guest: str


def installed(status: str) -> Iterator[dict[str, str]]:
    """The fields of each package dpkg's status file (text) says is installed (its
    continuation lines, which hold no field of their own, left out)."""
    for paragraph in status.split("\n\n"):
        fields = dict(
            line.split(": ", 1)
            for line in paragraph.splitlines()
            if ": " in line and not line[:1].isspace()
        )
        if fields.get("Status", "").endswith(" installed"):
            yield fields


def installed_version(status: str, package: str) -> str | None:
    """The version of `package` if dpkg's status file (text) says it is installed."""
    return next((f.get("Version") for f in installed(status) if f.get("Package") == package), None)


def host_version(package: str) -> str | None:
    try:
        out = run(["dpkg-query", "-W", "-f=${Status}|${Version}", package])
    except (CommandError, OSError):
        return None
    status, _, version = out.stdout.partition("|")
    return version if status.endswith(" installed") else None


def merged(path: str) -> str:
    """The path as it is stored in a merged-/usr root (`/bin/sed` -> `/usr/bin/sed`)."""
    for old, new in _MERGED.items():
        if path.startswith(old):
            return new + path.removeprefix(old)
    return path


def inside(root: Path, guest: str) -> Path | None:
    """`guest` in `root` if it is a normal absolute path (no `.` or `..`) and it and every
    directory above it are real (no symlink can take the path out of the root), else None."""
    if not guest.startswith("/") or posixpath.normpath(guest) != guest or guest == "/":
        return None
    path = root
    for part in guest.strip("/").split("/"):
        path = path / part
        if path.is_symlink() or not path.exists():
            return None
    return path


def target_file(root: Path, guest: str) -> Path | None:
    """`guest` in `root` if it is a regular file there (see `inside`), else None: what the
    host reads from the target is never a device, a FIFO or a host file behind a link."""
    path = inside(root, guest)
    return path if path is not None and stat.S_ISREG(path.lstat().st_mode) else None


def package_tools(root: Path, package: str, list_text: str) -> list[Bind]:
    """The package's executables in /usr/bin and /usr/sbin that are plain files both in
    the target and on the host (guest path = host path), from its dpkg file list;
    MACHINE_TOOLS excepted."""
    binds = {}
    for line in list_text.splitlines():
        guest = merged(line.strip())
        if posixpath.dirname(guest) not in _TOOL_DIRS or guest in MACHINE_TOOLS:
            continue
        target, host = target_file(root, guest), Path(guest)
        if target is None or host.is_symlink() or not host.is_file():
            continue
        if target.stat().st_mode & 0o111 and host.stat().st_mode & 0o111:
            binds[guest] = Bind(host, guest)
    return sorted(binds.values(), key=lambda b: b.guest)


def dpkg_list(root: Path, package: str) -> str:
    """The target's file list of `package` (`name.list` or `name:arch.list`), or ''."""
    info = root / "var/lib/dpkg/info"
    names = [f"{package}.list", *sorted(p.name for p in info.glob(f"{package}:*.list"))]
    for name in names:
        if (path := target_file(root, f"/var/lib/dpkg/info/{name}")) is not None:
            return path.read_text(encoding="utf-8", errors="replace")
    return ""


def same_packages(root: Path, packages: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(the packages installed at the same version on the host and in the target, the
    reasons for the others)."""
    status_file = target_file(root, "/var/lib/dpkg/status")
    if status_file is None:
        return [], ["the target has no dpkg status file"]
    status = status_file.read_text(encoding="utf-8")
    same, reasons = [], []
    for package in packages:
        ours, theirs = host_version(package), installed_version(status, package)
        if ours is not None and ours == theirs:
            same.append(package)
        elif theirs is not None:
            reasons.append(f"host {package} {ours or 'not installed'}, target's {theirs}")
    return same, reasons


def interpreter(binary: bytes) -> tuple[int, int, str] | None:
    """(offset, size, path) of a 64-bit ELF binary's PT_INTERP, or None (static, not ELF64)."""
    if binary[:4] != b"\x7fELF" or binary[4] != 2 or binary[5] not in (1, 2):
        return None
    order = "<" if binary[5] == 1 else ">"
    phoff, phentsize, phnum = (
        struct.unpack_from(order + "Q", binary, 0x20)[0],
        *struct.unpack_from(order + "HH", binary, 0x36),
    )
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
            order + "IIQQQQ", binary, phoff + i * phentsize
        )
        if p_type == _PT_INTERP:
            path = binary[p_offset : p_offset + p_filesz].split(b"\0")[0].decode()
            return p_offset, p_filesz, path
    return None


def with_interpreter(binary: bytes, path: str) -> bytes:
    """The binary with `path` as its ELF interpreter (it must fit the old one's space)."""
    found = interpreter(binary)
    if found is None:
        return binary
    offset, size, _ = found
    new = path.encode() + b"\0"
    if len(new) > size:
        raise ValueError(f"{path} does not fit a {size}-byte PT_INTERP")
    return binary[:offset] + new.ljust(size, b"\0") + binary[offset + size :]


def library_binds(root: Path) -> tuple[list[Bind], list[str]]:
    """The host's library directory and dynamic loader, and why they cannot be used."""
    multiarch = getattr(sys.implementation, "_multiarch", "")
    with Path(sys.executable).resolve().open("rb") as python:  # its headers, not 6 MB
        found = interpreter(python.read(65536))
    if not multiarch or not Path(f"/usr/lib/{multiarch}").is_dir() or found is None:
        return [], ["the host's library directory or loader is unknown"]
    binds = [Bind(Path(f"/usr/lib/{multiarch}"), f"/usr/lib/{multiarch}"),
             Bind(Path(found[2]).resolve(), LOADER)]  # fmt: skip
    taken = [b.guest for b in binds if (root / b.guest[1:]).exists()]
    reasons = [f"{guest} exists in the target" for guest in taken]
    # The mount points are made in these directories: a symlink must not lead out.
    parents = sorted({b.guest.rsplit("/", 1)[0] for b in binds})
    reasons += [f"{d} is not a directory in the target" for d in parents if not _real_dir(root, d)]
    return binds, reasons


def _real_dir(root: Path, guest: str) -> bool:
    path = inside(root, guest)
    return path is not None and path.is_dir()


def tool_binds(root: Path, packages: tuple[str, ...]) -> tuple[list[Bind], list[str]]:
    """Everything that puts the host's binaries of `packages` (those at the target's
    version) in the chroot; and why some (or, with library problems, all) cannot be."""
    binds, reasons = library_binds(root)
    same, others = same_packages(root, packages)
    tools = [b for package in same for b in package_tools(root, package, dpkg_list(root, package))]
    return ([], reasons + others) if reasons else (binds + tools, others)


def summary(binds: list[Bind], reasons: list[str]) -> str:
    """`N of the host's binaries` (its tools, not its library directory or loader), and
    why the others stay emulated."""
    tools = sum(b.host.is_file() and b.guest != LOADER for b in binds)
    return f"{tools} of the host's binaries" + (
        f"; emulated: {'; '.join(reasons)}" if reasons else ""
    )


def native_script(binds: list[Bind], probe: list[str], command: str) -> str:
    """Run inside `unshare --mount` with the root as $1 and a marker path as $2: bind
    (read-only: nothing in the chroot may write to the host's files), probe, run the
    command. A bind or the probe failing touches the marker, so that the command's own
    exit status never reads as "the host's binaries cannot be used"."""
    lines = ["set -u", "marker=$2", 'fallback() { : > "$marker"; exit 1; }']
    lines += [
        f'mount --bind -o ro {shlex.quote(str(b.host))} "$1"{shlex.quote(b.guest)} || fallback'
        for b in binds
    ]
    lines += [
        f'chroot "$1" {shlex.join(probe)} || fallback',
        f'exec chroot "$1" /bin/sh -c {shlex.quote(command)}',
    ]
    return "\n".join(lines) + "\n"


def mountpoint(root: Path, bind: Bind) -> Path | None:
    """Make the missing mount point of `bind` (a directory or an empty file); None if the
    root has it already."""
    path = root / bind.guest[1:]
    if path.exists() or path.is_symlink():
        return None
    if bind.host.is_dir():
        path.mkdir()
    else:
        path.touch()
    return path


def remove_mountpoint(path: Path) -> None:
    """Remove what `mountpoint` made, once nothing is mounted on it: an empty directory or
    an empty file."""
    if path.is_dir() and not path.is_symlink():
        path.rmdir()
    else:
        path.unlink()


def relocated(binds: list[Bind], scratch: Path) -> list[Bind]:
    """Binaries become copies in `scratch` whose interpreter is LOADER."""
    out = []
    for bind in binds:
        if bind.host.is_file() and bind.guest != LOADER:
            data = bind.host.read_bytes()
            if interpreter(data) is not None:
                copy = scratch / bind.guest.strip("/").replace("/", "_")
                copy.write_bytes(with_interpreter(data, LOADER))
                copy.chmod(bind.host.stat().st_mode & 0o7777)
                bind = Bind(copy, bind.guest)
        out.append(bind)
    return out


def run_native(root: Path, binds: list[Bind], probe: list[str], command: str) -> bool:
    """Run `command` in the chroot with `binds`; False (nothing run) if `probe` fails."""
    made: list[Path] = []
    try:
        with tempfile.TemporaryDirectory(prefix="fleetbake-hosttools-") as scratch:
            mounts = relocated(binds, Path(scratch))
            for bind in mounts:  # one by one: a failure still removes what was made
                if (point := mountpoint(root, bind)) is not None:
                    made.append(point)
            fell_back = Path(scratch) / "fallback"
            unshare = ["unshare", "--mount", "--propagation", "private"]
            script = native_script(mounts, probe, command)
            argv = [*unshare, "sh", "-c", script, "sh", str(root), str(fell_back)]
            done = run(argv, check=False)
            if fell_back.exists():
                return False
    finally:
        for path in reversed(made):
            remove_mountpoint(path)
    if done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stdout, done.stderr)
    return True


def run_in_chroot(root: Path, command: str) -> None:
    """`command` in the chroot with the target's own binaries (emulated if foreign)."""
    run(["chroot", str(root), "/bin/sh", "-c", command])
