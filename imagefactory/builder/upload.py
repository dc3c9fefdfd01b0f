"""Resumable upload of one artifact: announce it, then send chunks from wherever the
master says the upload stands. The master verifies the sha256 once the last byte is in."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from imagefactory.builder.master import MasterClient, Refused

CHUNK_BYTES = 8 * 1024 * 1024
"""Well under the master's default request body limit (32 MiB); halved on a 413."""
MIN_CHUNK_BYTES = 64 * 1024


def sha256_digest(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


def upload(
    master: MasterClient,
    build_id: str,
    attempt: int,
    path: Path,
    digest: str,
    on_progress: Callable[[int, int], None] | None = None,
) -> None:
    """Send `path` (whose digest is `digest`) until the master holds all of it. Network
    errors propagate (master.Unreachable): calling again resumes at the master's offset."""
    size = path.stat().st_size
    offset, complete = master.upload_status(build_id, attempt, digest, size)
    chunk_bytes = CHUNK_BYTES
    with path.open("rb") as f:
        while not complete:
            f.seek(offset)
            chunk = f.read(chunk_bytes)
            if offset < size and not chunk:
                raise OSError(f"{path} shrank while it was uploaded")
            try:
                offset, complete = master.upload_chunk(
                    build_id, attempt, digest, size, offset, chunk
                )
            except Refused as exc:
                if exc.status != 413 or chunk_bytes <= MIN_CHUNK_BYTES:
                    raise
                chunk_bytes //= 2  # the master takes smaller bodies (serve --max-body-bytes)
                continue
            if on_progress is not None:
                on_progress(offset, size)
