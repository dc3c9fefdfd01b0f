"""The environment store on disk: content-addressed blobs and resumable uploads.

    STORE/blobs/sha256/ab/abcdef...   one file per digest, read-only, never rewritten
    STORE/uploads/<upload id>         an upload in progress; its size is its offset

An upload is appended to in order (the offset the client names must be the file's size),
verified by sha256 once it reaches its announced size and only then renamed into
`blobs/`. An append holds flock on the upload file from the offset check to the publish,
so a retried chunk racing the first (threads, or replicas sharing the store) is refused
rather than written twice. A blob that already exists is not written twice: the upload is
dropped and the existing file stays. Every file is created 0600 under 0700 directories.

Pruning reads what the database still references, then deletes the other blobs and
uploads. A request that writes a blob or records what needs one holds STORE/prune.lock
shared while it does both (`in_use`), and prune holds it exclusively (`pruning`): it sees
such a change whole or not at all, never a finished build's artifact as unreferenced.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
_DIGEST = re.compile(DIGEST_PATTERN)
CHUNK = 1024 * 1024


class UploadError(Exception):
    """An upload that cannot go on; `offset` is where the stored part ends. `invalid`: the
    data is wrong (bad digest, too long), else the client is at the wrong offset."""

    def __init__(self, message: str, offset: int, invalid: bool = False) -> None:
        super().__init__(message)
        self.offset = offset
        self.invalid = invalid


def check_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise ValueError(f"{digest!r} is not a digest like sha256:<64 hex digits>")
    return digest


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.uploads = root / "uploads"

    def path(self, digest: str) -> Path:
        hexdigest = check_digest(digest).removeprefix("sha256:")
        return self.blobs / hexdigest[:2] / hexdigest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def put_bytes(self, data: bytes) -> str:
        """Store a small blob (a pipeline archive) at once; returns its digest."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            _private_dirs(self.uploads)
            fd, scratch = tempfile.mkstemp(prefix="put-", dir=self.uploads)  # one per caller
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            self._publish(Path(scratch), digest)
        return digest

    def read_bytes(self, digest: str) -> bytes | None:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            return None

    # -- resumable uploads ------------------------------------------------------------------

    def upload_offset(self, upload_id: str, digest: str) -> int:
        """How much of the upload is stored: its size, or the blob's when already stored."""
        if self.has(digest):
            return self.size(digest)
        try:
            return self._upload_path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, upload_id: str, digest: str, size: int, offset: int, data: bytes) -> int:
        """Add `data` at `offset` (which must be where the upload ends); once `size` bytes
        are there, verify the digest and store the blob. Returns the new offset."""
        if self.has(digest):
            return self.size(digest)
        path = self._upload_path(upload_id)
        with self._locked(path) as fd:
            if self.has(digest):  # completed while we waited for the lock
                path.unlink(missing_ok=True)
                return self.size(digest)
            current = os.fstat(fd).st_size
            if offset != current:
                raise UploadError(f"upload is at offset {current}, not {offset}", current)
            if current + len(data) > size:
                raise UploadError(f"upload would exceed its announced size {size}", current, True)
            _write_all(fd, data)
            current += len(data)
            if current == size:
                actual = file_digest(path)
                if actual != digest:
                    path.unlink()
                    raise UploadError(f"uploaded data has digest {actual}, not {digest}", 0, True)
                self._publish(path, digest)
        return current

    def discard_uploads(self, prefix: str) -> None:
        """Drop the uploads whose id starts with `prefix` (a build's, once it ended)."""
        for path in self._listed(self.uploads):
            if path.name.startswith(prefix):
                path.unlink(missing_ok=True)

    # -- listing and pruning ----------------------------------------------------------------

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Held (shared, by any number of requests at once) while blobs are written and
        what needs them is recorded."""
        with self._store_lock(fcntl.LOCK_SH):
            yield

    @contextmanager
    def pruning(self) -> Iterator[None]:
        """Held (exclusively) while prune decides what is unreferenced and deletes it."""
        with self._store_lock(fcntl.LOCK_EX):
            yield

    def digests(self) -> Iterator[str]:
        for bucket in self._listed(self.blobs):
            for path in self._listed(bucket):
                yield f"sha256:{path.name}"

    def remove(self, digest: str) -> int:
        """Delete a blob; returns the bytes freed (0 if it was not there)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    # -- internals --------------------------------------------------------------------------

    def _upload_path(self, upload_id: str) -> Path:
        if "/" in upload_id or upload_id.startswith("."):
            raise ValueError(f"bad upload id {upload_id!r}")
        return self.uploads / upload_id

    @contextmanager
    def _store_lock(self, operation: int) -> Iterator[None]:
        _private_dirs(self.root)
        fd = os.open(self.root / "prune.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, operation)  # (closing the file releases it)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self, path: Path) -> Iterator[int]:
        """The upload file opened for appending, under an exclusive flock. Retried while
        the locked file is no longer the one at `path` (published or dropped meanwhile)."""
        _private_dirs(path.parent)
        while True:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    current = os.stat(path).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield fd
                    return
            finally:
                os.close(fd)  # also releases the lock

    def _publish(self, scratch: Path, digest: str) -> None:
        """Move a verified file into place with one rename (readers never see a part)."""
        final = self.path(digest)
        _private_dirs(final.parent)
        os.chmod(scratch, 0o400)
        os.replace(scratch, final)

    @staticmethod
    def _listed(directory: Path) -> list[Path]:
        try:
            return sorted(directory.iterdir())
        except FileNotFoundError:
            return []


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _private_dirs(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
