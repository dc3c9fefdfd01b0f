"""``executor pack``: a validated pipeline directory as one reproducible ``.tar.gz``.

The same directory always packs to the same bytes (sorted members, zero times and owners,
no gzip timestamp), so its sha256 can be pinned in EXECUTOR_PIPELINE_SHA256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

from executor.files import write_output
from executor.pipeline import MANIFEST, PipelineError, load_pipeline

# Build leftovers that must not change the archive's hash.
_SKIPPED = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


def pack(directory: str | os.PathLike[str], output: str | os.PathLike[str]) -> str:
    """Validate ``directory``, write it to ``output`` as ``.tar.gz``; return the sha256 hex."""
    root = Path(directory)
    if not root.is_dir():
        raise PipelineError(root, "not a directory (pack takes a pipeline directory)")
    # Packing needs no task imports when the packing Python lacks the declared requirements.
    load_pipeline(root, imports="when-installed")
    target = Path(output)
    data = _archive_bytes(root, skip=target)
    try:
        write_output(target, data)
    except OSError as exc:
        raise PipelineError(target, f"cannot write the archive: {exc.strerror}") from None
    return hashlib.sha256(data).hexdigest()


def _archive_bytes(root: Path, skip: Path) -> bytes:
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _members(root, skip):
            name = path.relative_to(root).as_posix()
            if path.is_dir():
                tar.addfile(_normalized(tar.gettarinfo(str(path), arcname=name), 0o755))
                continue
            with path.open("rb") as content:  # fstat: symbolic links are dereferenced
                info = tar.gettarinfo(arcname=name, fileobj=content)
                mode = 0o755 if os.access(path, os.X_OK) else 0o644
                tar.addfile(_normalized(info, mode), content)
    gz_buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=gz_buffer, mode="wb", mtime=0, filename="") as gz:
        gz.write(tar_buffer.getvalue())
    return gz_buffer.getvalue()


def _same_file(path: Path, other: Path) -> bool:
    try:
        return path.samefile(other)
    except OSError:
        return False


def _normalized(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = mode
    return info


def _members(root: Path, skip: Path) -> list[Path]:
    """Directories and regular files below root, sorted, pipeline.json first; without
    ``skip`` (the archive itself, when it is written into the directory it packs)."""
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED)
        base = Path(current)
        if base != root:
            found.append(base)
        found.extend(
            base / f
            for f in sorted(files)
            if (base / f).is_file() and not _same_file(base / f, skip)
        )
    found.sort(key=lambda p: (p.relative_to(root).as_posix() != MANIFEST, p.as_posix()))
    return found
