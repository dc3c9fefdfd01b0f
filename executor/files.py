"""Writing output files: atomically where that is safe, directly where it is not.

A regular file, or a path that does not exist yet, is written to a temporary file beside
it, flushed to disk and renamed over it, so that neither a reader nor a crash ever sees
half of it. Renaming over anything else would replace it: as root, results written to
`/dev/null` that way replace the device node and break every later process on the
machine. So character devices and FIFOs (`/dev/null`, `/dev/stdout`, a named pipe) are
written directly, and any other kind (a directory, a socket, a block device) is refused
with an OSError naming the path.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _writes_directly(path: Path) -> bool:
    """True for a device or pipe, False for a regular file or nothing; refuses the rest."""
    try:
        mode = path.stat().st_mode  # follows links: /dev/stdout is one
    except FileNotFoundError:
        return False
    if stat.S_ISREG(mode):
        return False
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return True
    raise OSError(errno.EINVAL, "not a regular file, character device or pipe", str(path))


@contextmanager
def output_file(path: str | os.PathLike[str], mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file to write `path` through; it takes the place of `path` only when the
    block ends without an exception (for a device or pipe: written as it goes).

    A regular file gets exactly `mode`, whatever the umask: 0o600 for secrets. A symbolic
    link to a regular file stays a link: its target is replaced."""
    if _writes_directly(Path(path)):
        with open(path, "wb") as direct:
            yield direct
        return
    target = Path(os.path.realpath(path))
    with _named(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            yield out
            with _named(target):
                out.flush()
                os.fsync(out.fileno())
        with _named(target):
            os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


@contextmanager
def _named(target: Path) -> Iterator[None]:
    """An OSError about the temporary file names the file the user asked for."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from exc


def write_output(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Write all of `data` to `path` as `output_file` does."""
    with output_file(path, mode) as out:
        out.write(data)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` survive a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
