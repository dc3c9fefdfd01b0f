"""Download an environment from the store of the core services, resumable and verified:
what `environments pull` writes where it is told, and what `boot --from` keeps in the
local cache.

    GET /v1/environments/DIGEST (Range: bytes=N-, If-Range: "DIGEST" when a part exists)
      ─► DIRECTORY/.HEX.part (appended to, hashed as it is written)
      ─► sha256 == DIGEST ? rename to DIRECTORY/NAME : delete the part, refuse

A file appears under its name only once its sha256 is the digest, so a name in the
cache (cache_root()/environments/HEX/NAME) is trusted without hashing it again. One
pull at a time writes into a directory (flock on the directory), so two pulls of one
digest never append to the same part.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Any

from imagefactory.client import AdminClient
from imagefactory.errors import HostError, die
from imagefactory.paths import cache_root

CHUNK = 1024 * 1024
REPORT_EVERY_S = 2.0
"""Progress lines on a long download: at most one per this many seconds."""
MIB = 1024 * 1024


def environment(client: AdminClient, digest: str) -> dict[str, Any]:
    """The store's record of DIGEST: name, size, target, format, pipeline, build."""
    for env in client.get_json("/v1/environments"):
        if env["digest"] == digest:
            return dict(env)
    raise die(f"no environment {digest}", hint="see `imagefactory environments list`")


def as_node(node_id: str | None) -> dict[str, str]:
    """The header that makes the client's token a node's (which may download, not list)."""
    return {} if node_id is None else {"X-Node-ID": node_id}


def described(client: AdminClient, digest: str, node_id: str | None) -> dict[str, Any]:
    """DIGEST's digest, name and size as a node sees them: a node's token may download but
    not list, so a one-byte ranged download says them (Content-Disposition, Content-Range)."""
    if node_id is None:
        return environment(client, digest)
    headers = {"Range": "bytes=0-0", **as_node(node_id)}
    with client.stream(f"/v1/environments/{digest}", headers) as response:
        client.check(response)
        disposition = Message()
        disposition["content-disposition"] = response.headers.get("content-disposition", "")
        total = response.headers.get("content-range", "").rpartition("/")[2]
    if response.status_code != 206 or not total.isdigit():
        raise die(f"{client.url} answered a ranged download of {digest} without its size")
    return {"digest": digest, "name": disposition.get_filename() or "", "size": int(total)}


def file_name(env: dict[str, Any]) -> str:
    """The record's name as a plain file name (never a path, never hidden)."""
    name = str(env["name"])
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise die(f"environment {env['digest']} has an unusable file name {name!r}")
    return name


def cache_dir(digest: str) -> Path:
    return cache_root() / "environments" / digest.removeprefix("sha256:")


def cached(
    client: AdminClient,
    digest: str,
    progress: Callable[[str], None],
    env: dict[str, Any] | None = None,
    node_id: str | None = None,
) -> Path:
    """pull() into the local cache; a file already there is returned without a download
    (only a verified download is ever renamed into the cache). `node_id`: the client's
    token is that node's."""
    env = env or described(client, digest, node_id)
    path = cache_dir(digest) / file_name(env)
    if _complete(path, env):
        progress(f"{path.name}: in the cache ({path})")
        return path
    return pull(client, digest, cache_dir(digest), progress, env, node_id)


def pull(
    client: AdminClient,
    digest: str,
    directory: Path,
    progress: Callable[[str], None],
    env: dict[str, Any] | None = None,
    node_id: str | None = None,
) -> Path:
    """The environment DIGEST as DIRECTORY/<its name>: resumes DIRECTORY/.<hex>.part,
    verifies sha256 (a mismatch deletes the part and raises die(...)), renames into place.
    Returns at once if the verified file is already there. `env`: its record, if known;
    `node_id`: the client's token is that node's."""
    env = env or described(client, digest, node_id)
    final = directory / file_name(env)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise die(f"cannot make {directory}: {exc.strerror}") from None
    with locked(directory):
        if _complete(final, env) and _sha256(final) == digest:
            progress(f"{final.name}: already there, verified ({final})")
            return final
        part = directory / f".{digest.removeprefix('sha256:')}.part"
        meter = Meter(final.name, progress)
        actual = _download(client, digest, part, meter, as_node(node_id))
        if actual != digest:
            part.unlink(missing_ok=True)
            raise die(f"downloaded data has digest {actual}, not {digest}; removed it")
        os.replace(part, final)
    progress(f"{final.name}: verified {digest}")
    return final


class Meter:
    """Progress of one download: `NAME: 42% (120.0 of 285.3 MiB, 31.2 MiB/s)` lines, at
    most one per REPORT_EVERY_S, and one when it is done."""

    def __init__(self, name: str, progress: Callable[[str], None]) -> None:
        self.name, self.progress = name, progress
        self.total = self.start_at = self.done = 0
        self.started = self.last = time.monotonic()

    def begin(self, start_at: int, total: int) -> None:
        self.start_at = self.done = start_at
        self.total = total
        if start_at:
            self.progress(f"{self.name}: resuming at {start_at} of {total} bytes")
        else:
            self.progress(f"{self.name}: downloading {total} bytes")

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= REPORT_EVERY_S and self.done < self.total:
            self.last = now
            self.progress(f"{self.name}: {self.line(now)}")

    def line(self, now: float) -> str:
        percent = 100 * self.done // self.total if self.total else 100
        rate = (self.done - self.start_at) / MIB / max(now - self.started, 1e-6)
        return f"{percent}% ({self.done / MIB:.1f} of {self.total / MIB:.1f} MiB, {rate:.1f} MiB/s)"

    def end(self) -> None:
        now = time.monotonic()
        self.progress(f"{self.name}: {self.line(now)} in {now - self.started:.1f} s")


def _download(
    client: AdminClient, digest: str, part: Path, meter: Meter, extra: dict[str, str]
) -> str:
    """Append to `part` from its size (Range, If-Range: the digest), or start over if the
    master sends the whole file; returns the sha256 digest of the whole part, hashed
    while it is written (a kept part is hashed first)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-", "If-Range": f'"{digest}"'} if have else {}
    headers.update(extra)
    with client.stream(f"/v1/environments/{digest}", headers) as response:
        if response.status_code == 416:  # the part is already whole (or longer): redo
            part.unlink()
            return _download(client, digest, part, meter, extra)
        client.check(response)
        resumed = response.status_code == 206
        total = int(response.headers.get("content-length", 0)) + (have if resumed else 0)
        meter.begin(have if resumed else 0, total)
        try:
            sha = _write(part, resumed, have, response.iter_bytes(CHUNK), meter)
        except OSError as exc:  # a full disk, say: the part stays for the next try
            raise HostError(f"{part}: {exc.strerror or exc}") from None
    meter.end()
    return "sha256:" + sha.hexdigest()


def _write(
    part: Path, resumed: bool, have: int, chunks: Iterator[bytes], meter: Meter
) -> hashlib._Hash:
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+b") as out:
        sha = hashlib.file_digest(out, "sha256") if resumed else hashlib.sha256()
        out.seek(have if resumed else 0)
        out.truncate()
        for chunk in chunks:
            out.write(chunk)
            sha.update(chunk)
            meter.add(len(chunk))
        out.flush()
        os.fsync(out.fileno())
    return sha


def _complete(path: Path, env: dict[str, Any]) -> bool:
    try:
        return path.is_file() and path.stat().st_size == env["size"]
    except OSError:
        return False


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One writer at a time into `directory` (flock; the lock ends with the process)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
