"""Unpacking pipeline archives safely: bounded, plain files only, no owners or special bits.

A pipeline archive comes from a user or over the network. The decompressed stream passes
through a counter, so a small `.tar.gz` that expands to gigabytes (in its files or in one
huge header) stops at the byte limit, and a member count limit stops archives of countless
tiny files. Each member is written here rather than by `tarfile.extractall`, so the same
rules hold on every Python version (Debian 12's 3.11.2 has no extraction filters):
regular files and directories only, every path inside the root, no symbolic links
followed, modes 0644 or 0755 (no setuid, setgid or sticky bits), owned by whoever
extracts.
"""

from __future__ import annotations

import gzip
import os
import tarfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from executor.settings import check_count

MiB = 1024 * 1024
_CHUNK = MiB


class ArchiveError(Exception):
    """An archive that cannot or must not be unpacked; str() is one line."""


@dataclass(frozen=True)
class ArchiveLimits:
    """How big a pipeline archive may be. The defaults suit code and modest data."""

    max_bytes: int = 512 * MiB
    """EXECUTOR_PIPELINE_MAX_BYTES: the unpacked tar stream (files, headers, padding)."""
    max_files: int = 20_000
    """EXECUTOR_PIPELINE_MAX_FILES: members (files and directories)."""
    max_download_bytes: int = 256 * MiB
    """EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES: a gateway download, as sent (compressed)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ArchiveLimits:
        """The limits, each overridable by its variable; a bad value raises SettingsError
        (a ValueError)."""
        return cls(
            max_bytes=_positive(env, "EXECUTOR_PIPELINE_MAX_BYTES", cls.max_bytes),
            max_files=_positive(env, "EXECUTOR_PIPELINE_MAX_FILES", cls.max_files),
            max_download_bytes=_positive(
                env, "EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES", cls.max_download_bytes
            ),
        )


def _positive(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    return check_count(name, raw) if raw else default


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Bounded:
    """A read-only stream that fails once more than `limit` bytes have been read."""

    def __init__(self, inner: _Readable, limit: int) -> None:
        self._inner = inner
        self.left = limit

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.left -= len(data)
        if self.left < 0:
            raise ArchiveError(_too_big_message())
        return data


def _too_big_message() -> str:
    return "unpacks to more than EXECUTOR_PIPELINE_MAX_BYTES"


def extract(archive: Path, root: Path, limits: ArchiveLimits) -> None:
    """Unpack the `.tar.gz` `archive` into the empty directory `root`, within `limits`.

    Raises ArchiveError (the archive is bad or too big) or OSError (writing failed)."""
    try:
        with archive.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            stream = _Bounded(unzipped, limits.max_bytes)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # type: ignore[call-overload]
                _extract_members(tar, root, stream, limits)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ArchiveError(f"not a valid .tar.gz archive ({exc})") from None


def _extract_members(
    tar: tarfile.TarFile, root: Path, stream: _Bounded, limits: ArchiveLimits
) -> None:
    for count, member in enumerate(tar, start=1):
        if count > limits.max_files:
            raise ArchiveError(
                f"has more than {limits.max_files} members (EXECUTOR_PIPELINE_MAX_FILES)"
            )
        if member.size > stream.left:  # fail before reading what cannot fit
            raise ArchiveError(_too_big_message())
        target = root.joinpath(*_parts(member.name))
        if member.isdir():
            target.mkdir(mode=0o755, parents=True, exist_ok=True)
        elif member.isfile():
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has content
            _write_file(target, member.name, source, 0o755 if member.mode & 0o111 else 0o644)
        else:
            raise ArchiveError(f"refusing member {member.name!r}: not a file or directory")


def _parts(name: str) -> tuple[str, ...]:
    """The path parts of a member name, refused unless it stays inside the root."""
    path = PurePosixPath(name)
    parts = tuple(p for p in path.parts if p != ".")
    if path.is_absolute() or not parts or ".." in parts:
        raise ArchiveError(f"refusing member {name!r}: not a path inside the archive")
    return parts


def _write_file(target: Path, name: str, source: IO[bytes], mode: int) -> None:
    target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(target, flags, mode)
    except FileExistsError:
        raise ArchiveError(f"member {name!r} appears twice") from None
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(_CHUNK):
            out.write(chunk)
        os.fchmod(out.fileno(), mode)  # exactly this mode, whatever the umask
