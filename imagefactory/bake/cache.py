"""The content-addressed cache of base images.

Each entry is a directory named by the sha256 of its inputs, holding `base.qcow2` and
`inputs.json`. An entry appears atomically (built in a `.tmp-*` directory, then renamed),
so a crashed build never leaves a half entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.paths import cache_root

IMAGE_NAME = "base.qcow2"
INPUTS_NAME = "inputs.json"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    key: str
    path: Path
    inputs: dict[str, Any]
    size: int
    mtime: float
    image_name: str = IMAGE_NAME

    @property
    def image(self) -> Path:
        return self.path / self.image_name

    @property
    def sha256(self) -> str:
        return (self.path / f"{self.image_name}.sha256").read_text().strip()


class BaseCache:
    """`kind` names the cache's own directory and `image_name` its main file, so other
    environment kinds (the container base: bake/ocibase.py) are cached the same way;
    `extra_files` are further files an entry keeps."""

    def __init__(
        self,
        root: Path | None = None,
        kind: str = "base",
        image_name: str = IMAGE_NAME,
        extra_files: tuple[str, ...] = (),
    ) -> None:
        self.dir = (root or cache_root()) / kind
        self.image_name = image_name
        self.files = (image_name, INPUTS_NAME, f"{image_name}.sha256", *extra_files)

    def lookup(self, key: str) -> Entry | None:
        path = self.dir / key
        if not all((path / name).is_file() for name in self.files):
            return None
        os.utime(path)  # last use, for `cache prune --older-than`
        return self._entry(path)

    def _entry(self, path: Path) -> Entry:
        inputs = json.loads((path / INPUTS_NAME).read_text())
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        return Entry(path.name, path, inputs, size, path.stat().st_mtime, self.image_name)

    def entries(self) -> list[Entry]:
        if not self.dir.is_dir():
            return []
        found = [
            self._entry(p)
            for p in sorted(self.dir.iterdir())
            if not p.name.startswith(".") and (p / self.image_name).is_file()
        ]
        return sorted(found, key=lambda e: e.mtime, reverse=True)

    @contextmanager
    def building(self, key: str, inputs: dict[str, Any]) -> Iterator[Path]:
        """A scratch directory for a new entry; it becomes the entry only if the block
        completes, and is removed in every case."""
        self.dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.dir))
        try:
            yield scratch
            (scratch / INPUTS_NAME).write_text(json.dumps(inputs, indent=2, sort_keys=True))
            image = scratch / self.image_name
            image.with_name(f"{image.name}.sha256").write_text(sha256_file(image) + "\n")
            final = self.dir / key
            if final.exists():
                return  # a concurrent build of the same inputs won; it may be in use
            # Keep only the entry's files: the build's working files stay in scratch.
            done = Path(tempfile.mkdtemp(prefix=".tmp-done-", dir=self.dir))
            for name in self.files:
                (scratch / name).rename(done / name)
            try:
                done.rename(final)
            except OSError:  # lost that race just now
                shutil.rmtree(done, ignore_errors=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def prune(self, keep: int | None = None, older_than_s: float | None = None) -> list[Entry]:
        """Remove entries beyond the `keep` most recently used ones and those unused for
        longer than `older_than_s` (with neither limit: all of them), plus day-old leftovers
        of interrupted builds. Returns the removed entries."""
        removed = []
        now = time.time()
        everything = keep is None and older_than_s is None
        for i, entry in enumerate(self.entries()):
            too_many = keep is not None and i >= keep
            too_old = older_than_s is not None and now - entry.mtime > older_than_s
            if everything or too_many or too_old:
                shutil.rmtree(entry.path)
                removed.append(entry)
        for leftover in self.dir.glob(".tmp-*") if self.dir.is_dir() else []:
            if now - leftover.stat().st_mtime > 86400:
                shutil.rmtree(leftover, ignore_errors=True)
        return removed
