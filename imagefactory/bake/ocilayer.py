"""Deterministic OCI image layers: a directory tree -> `layer.tar.gz`, the same bytes for
the same tree on every build.

Members are sorted by path; times are clamped to SOURCE_DATE_EPOCH; owner names are
dropped (numeric ids stay, or are forced to root for files staged by the bake);
hard links stay links; gzip's header carries no name and no time. Device nodes,
sockets and the contents of the mount points a runtime provides (/dev, /proc, /sys,
/run, /tmp) are left out: the runtime makes those.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from imagefactory.bake.cache import sha256_file

RUNTIME_MOUNTS = ("dev", "proc", "sys", "run", "tmp")
"""Top-level directories kept empty in a layer."""
CHUNK = 1 << 20


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH (reproducible-builds.org) if set and valid, else 0 (1970)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    return int(value) if value.isdigit() else 0


@dataclass(frozen=True)
class Layer:
    path: Path
    digest: str
    """sha256 of the compressed blob: `sha256:HEX`."""
    diff_id: str
    """sha256 of the uncompressed tar: `sha256:HEX` (the image config lists these)."""
    size: int


def walk(root: Path) -> Iterator[Path]:
    """Every path below `root` in sorted order (by name bytes), without following links."""
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: os.fsencode(e.name))
    for entry in entries:
        path = Path(entry.path)
        yield path
        if entry.is_dir(follow_symlinks=False) and not _runtime_mount(root, path):
            yield from walk(path)


def _runtime_mount(root: Path, path: Path) -> bool:
    return path.parent == root and path.name in RUNTIME_MOUNTS


def write_layer(
    root: Path, out: Path, epoch: int, *, root_owned: bool = False, level: int = 9
) -> Layer:
    """Write the tree below `root` as a gzip-compressed layer to `out`.

    `root_owned` makes every member uid/gid 0 (files staged by the bake as any user)."""
    plain = out.with_name(f".{out.name}.tar")
    try:
        with tarfile.open(plain, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in walk(root):
                _add(tar, root, path, epoch, root_owned)
        return compress(plain, out, level)
    finally:
        plain.unlink(missing_ok=True)


def compress(plain: Path, out: Path, level: int = 9) -> Layer:
    """gzip `plain` into `out` (no name, no time in the header), hashing both sides."""
    diff = hashlib.sha256()
    with plain.open("rb") as src, out.open("wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=level) as gz:
            while chunk := src.read(CHUNK):
                diff.update(chunk)
                gz.write(chunk)
    return Layer(
        out, f"sha256:{sha256_file(out)}", f"sha256:{diff.hexdigest()}", out.stat().st_size
    )


def _add(tar: tarfile.TarFile, root: Path, path: Path, epoch: int, root_owned: bool) -> None:
    info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
    if info is None or info.ischr() or info.isblk() or info.isfifo():
        return  # sockets, devices and pipes: made by the runtime or at run time
    info.mtime = min(int(info.mtime), epoch)
    info.uname = info.gname = ""
    if root_owned:
        info.uid = info.gid = 0
    info.pax_headers = {}
    if info.isreg():
        with path.open("rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)
