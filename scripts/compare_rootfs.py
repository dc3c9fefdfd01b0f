"""Compare two root filesystem directories file by file, and their Debian package lists.

For every path: its type, mode, owner, group, link target (symlinks), device numbers
(device nodes), the sha256 of its contents (regular files) and its extended attributes
(file capabilities among them). Timestamps are left out:
two builds of the same recipe never agree on them. The package lists are the
`Package Version Architecture` triples of each tree's `var/lib/dpkg/status`.

    .venv/bin/python scripts/compare_rootfs.py OLD_ROOT NEW_ROOT
    .venv/bin/python scripts/compare_rootfs.py OLD_ROOT NEW_ROOT --ignore '/boot/initrd.img-*'
    .venv/bin/python scripts/compare_rootfs.py OLD_INITRD_DIR NEW_INITRD_DIR --files-only

Prints the differences (at most --limit of each kind) and a summary line; exits 0 when the
trees are the same, 1 when they differ, 2 on bad input. Run it as root: the trees hold
files only root can read.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import stat
import sys
from pathlib import Path

from imagefactory.bake.cache import sha256_file
from imagefactory.bake.hosttools import installed

Entry = tuple[str, ...]
STATUS = "var/lib/dpkg/status"

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFCHR: "char",
    stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket",
}  # fmt: skip


def describe(path: Path) -> Entry:
    """What is compared of one path: type, mode, uid, gid and its content or target."""
    st = path.lstat()
    kind = _TYPES[stat.S_IFMT(st.st_mode)]
    if kind == "file":
        content = sha256_file(path)
    elif kind == "link":
        content = os.readlink(path)
    elif kind in ("char", "block"):
        content = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    else:
        content = ""
    mode = f"{stat.S_IMODE(st.st_mode):04o}"
    return (kind, mode, str(st.st_uid), str(st.st_gid), content, extended_attributes(path))


def extended_attributes(path: Path) -> str:
    """name=hex of each extended attribute (file capabilities live there), sorted."""
    try:
        names = sorted(os.listxattr(path, follow_symlinks=False))
    except OSError:  # a file system without them
        return ""
    return ",".join(f"{n}={os.getxattr(path, n, follow_symlinks=False).hex()}" for n in names)


def manifest(root: Path, ignore: list[str]) -> dict[str, Entry]:
    """Every path below `root` (as the guest sees it, `/etc/...`) -> describe()."""
    out: dict[str, Entry] = {}
    device = root.stat().st_dev
    for dirpath, dirnames, filenames in os.walk(root):
        # Like `find -xdev`: a tree with /proc or /dev mounted in it (a build still
        # running) would otherwise be read through them, and /proc/kmsg never ends.
        names = sorted(dirnames + filenames)  # a mount point is listed, not entered
        dirnames[:] = sorted(d for d in dirnames if (Path(dirpath) / d).lstat().st_dev == device)
        for name in names:
            full = Path(dirpath) / name
            guest = "/" + str(full.relative_to(root))
            if not any(fnmatch.fnmatchcase(guest, pattern) for pattern in ignore):
                out[guest] = describe(full)
    return out


def packages(root: Path) -> dict[str, str]:
    """`name:arch` -> version of every installed package in the tree's dpkg status."""
    return {
        f"{fields['Package']}:{fields.get('Architecture', '')}": fields["Version"]
        for fields in installed((root / STATUS).read_text(encoding="utf-8"))
    }


def differences(old: dict[str, Entry], new: dict[str, Entry]) -> dict[str, list[str]]:
    """Paths only in one tree, and paths whose description differs, with what differs."""
    fields = ("type", "mode", "uid", "gid", "content", "xattrs")
    changed = []
    for path in sorted(old.keys() & new.keys()):
        if old[path] != new[path]:
            what = [f for f, a, b in zip(fields, old[path], new[path], strict=True) if a != b]
            changed.append(f"{path} ({', '.join(what)})")
    return {
        "only_old": sorted(old.keys() - new.keys()),
        "only_new": sorted(new.keys() - old.keys()),
        "changed": changed,
    }


def package_differences(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return [
        f"{name}: {old.get(name, '-')} -> {new.get(name, '-')}"
        for name in sorted(old.keys() | new.keys())
        if old.get(name) != new.get(name)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path, help="the reference root filesystem directory")
    parser.add_argument("new", type=Path, help="the root filesystem directory to check")
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="GLOB",
        help="guest paths to leave out (fnmatch, e.g. '/var/log/*'); repeatable",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=50, help="differences shown per kind")
    parser.add_argument(
        "--files-only", action="store_true",
        help="trees without a dpkg database (an unpacked initramfs): compare files only",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    for root in (args.old, args.new):
        if not root.is_dir() or not (args.files_only or (root / STATUS).is_file()):
            what = "not a directory" if not root.is_dir() else f"no {STATUS} (--files-only?)"
            print(f"Error: {root}: {what}", file=sys.stderr)
            return 2
    try:
        old, new = manifest(args.old, args.ignore), manifest(args.new, args.ignore)
    except OSError as exc:
        print(f"Error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    diff = differences(old, new)
    new_packages = {} if args.files_only else packages(args.new)
    pkgs = [] if args.files_only else package_differences(packages(args.old), new_packages)
    same = not pkgs and not any(diff.values())
    if args.json:
        print(json.dumps({"same": same, "paths": len(new), "packages": pkgs, **diff}, indent=2))
        return 0 if same else 1
    for kind, items in (("package", pkgs), *diff.items()):
        for item in items[: args.limit]:
            print(f"{kind}: {item}")
        if len(items) > args.limit:
            print(f"{kind}: ... {len(items) - args.limit} more")
    counts = ", ".join(f"{len(v)} {k}" for k, v in (("packages differ", pkgs), *diff.items()))
    count = "" if args.files_only else f", {len(new_packages)} packages"
    print(f"{len(old)} vs {len(new)} paths{count}: {counts}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
