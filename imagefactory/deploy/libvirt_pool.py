"""Volumes in a libvirt storage pool, written THROUGH the libvirt connection (so the same
code serves a local libvirtd and one behind `qemu+ssh://`): never a copy over a local
file system.

    environment image ──upload_base()──► fleetbake-<16 hex>.qcow2   shared per digest, kept
                                          ▲ backing store
    create_overlay()  ─────────────────► fleetbake-<node>.qcow2      per node
    upload_bytes()    ─────────────────► fleetbake-<node>-seed.iso   per node (holds the token)

The base upload is a sparse stream: only the image's data extents cross the connection,
its holes are sent as lengths. Volumes belong to the hypervisor's QEMU user (the label
the domain runs with), the node's own ones readable by it alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from imagefactory.boot.libvirt_backend import load_libvirt, lookup
from imagefactory.errors import die

PREFIX = "fleetbake-"
FILE_POOL_TYPES = ("dir", "fs", "netfs")
"""Pools whose volumes are files in one directory: a qcow2 overlay can be backed by a
base volume there, and the serial console can be written beside them."""
CHUNK = 1 << 20
HEADER_BYTES = 64 * 1024
"""The start of the image that is uploaded last: a qcow2 header (and more) that makes
libvirt see the volume as the finished image only once the rest is there."""
PROGRESS_EVERY_S = 5.0
REFRESH_WAIT_S = 60.0
DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})\Z")
_GUARD = threading.Lock()
_UPLOADS: dict[tuple[str, str, str], threading.Lock] = {}


@dataclass(frozen=True)
class Owner:
    """Who the node's QEMU runs as on the hypervisor; its volumes belong to it."""

    uid: int
    gid: int


@dataclass(frozen=True)
class ImageInfo:
    """What the pool must hold for one environment image."""

    size: int
    """The file's length in bytes (the volume's physical size once uploaded)."""
    virtual_size: int
    """The disk's size as the guest sees it (the qcow2 volume's capacity)."""


def base_volume_name(digest: str) -> str:
    """The shared volume of one environment: `fleetbake-<first 16 hex>.qcow2`."""
    match = DIGEST_RE.match(digest)
    if match is None:
        raise die(f"invalid environment digest {digest!r}", hint="sha256:<64 hex digits>")
    return f"{PREFIX}{match[1][:16]}.qcow2"


def node_volume_names(node_id: str) -> dict[str, str]:
    """The node's own volumes (file names in the pool's directory), by role."""
    return {
        "disk": f"{PREFIX}{node_id}.qcow2",
        "seed": f"{PREFIX}{node_id}-seed.iso",
        "console": f"{PREFIX}{node_id}-console.log",
    }


def open_pool(conn: Any, name: str, uri: str) -> Any:
    """The active storage pool NAME, with a file-backed type; one-line errors otherwise."""
    pool = lookup(conn.storagePoolLookupByName, name)
    if pool is None:
        raise die(
            f"no storage pool {name!r} at {uri}",
            hint="define one on the hypervisor, e.g. `virsh pool-define-as NAME dir "
            "--target /var/lib/libvirt/images && virsh pool-start NAME`",
        )
    kind = ET.fromstring(pool.XMLDesc(0)).get("type")
    if kind not in FILE_POOL_TYPES:
        raise die(
            f"storage pool {name!r} at {uri} is of type {kind}",
            hint=f"deploy needs a pool of type {', '.join(FILE_POOL_TYPES)}",
        )
    if not pool.isActive():
        raise die(f"storage pool {name!r} at {uri} is not active", hint="virsh pool-start NAME")
    refresh(pool)  # see files that appeared since libvirtd last looked
    return pool


def refresh(pool: Any) -> None:
    """Make libvirtd look at the pool's directory again. It refuses while it builds a
    volume there (another node's overlay, in a parallel deploy): wait for that."""
    libvirt = load_libvirt()
    deadline = time.monotonic() + REFRESH_WAIT_S
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            if time.monotonic() > deadline:
                message = exc.get_error_message()
                raise die(f"cannot refresh storage pool {pool.name()!r}: {message}") from None
        time.sleep(0.25)


def pool_directory(pool: Any) -> PurePosixPath:
    """The pool's directory on the hypervisor."""
    path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    if not path:
        raise die(f"storage pool {pool.name()!r} has no target directory")
    return PurePosixPath(path)


def find_volume(pool: Any, name: str) -> Any | None:
    return lookup(pool.storageVolLookupByName, name)


def delete_volume(pool: Any, name: str) -> bool:
    """Delete a volume; False if it was not there (already gone is fine)."""
    libvirt = load_libvirt()
    vol = find_volume(pool, name)
    if vol is None:
        return False
    try:
        vol.delete(0)
    except libvirt.libvirtError as exc:
        if find_volume(pool, name) is not None:
            raise die(f"cannot delete volume {name}: {exc.get_error_message()}") from None
    return True


def _volume_xml(
    name: str,
    capacity: int,
    fmt: str,
    owner: Owner,
    mode: int,
    backing: tuple[str, str] | None = None,
) -> str:
    vol = ET.Element("volume")
    ET.SubElement(vol, "name").text = name
    ET.SubElement(vol, "capacity", unit="bytes").text = str(capacity)
    # Nothing allocated up front: the upload writes the data, holes stay holes.
    ET.SubElement(vol, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(vol, "target")
    ET.SubElement(target, "format", type=fmt)
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = f"{mode:04o}"
    ET.SubElement(perms, "owner").text = str(owner.uid)
    ET.SubElement(perms, "group").text = str(owner.gid)
    if backing is not None:
        store = ET.SubElement(vol, "backingStore")
        ET.SubElement(store, "path").text = backing[0]
        ET.SubElement(store, "format", type=backing[1])
    return ET.tostring(vol, encoding="unicode")


def _create(pool: Any, xml: str, name: str) -> Any:
    libvirt = load_libvirt()
    try:
        return pool.createXML(xml, 0)
    except libvirt.libvirtError as exc:
        raise die(f"cannot create volume {name}: {exc.get_error_message()}") from None


def is_complete(vol: Any, image: ImageInfo) -> bool:
    """A finished upload. The image's first HEADER_BYTES are sent last, so libvirt probes
    a qcow2 of the image's virtual size only once everything else has arrived; before
    that, the volume is a raw file of zeros where the header belongs."""
    libvirt = load_libvirt()
    fmt = ET.fromstring(vol.XMLDesc(0)).find("target/format")
    _kind, capacity, _alloc = vol.info()
    _kind, _cap, physical = vol.infoFlags(libvirt.VIR_STORAGE_VOL_GET_PHYSICAL)
    return bool(
        fmt is not None
        and fmt.get("type") == "qcow2"
        and capacity == image.virtual_size
        and physical == image.size
    )


def upload_base(
    pool: Any,
    name: str,
    image: Path,
    info: ImageInfo,
    owner: Owner,
    progress: Callable[[str], None],
) -> tuple[Any, bool]:
    """The environment's base volume, uploaded unless a complete one is there already;
    (volume, whether it was uploaded now). A failed upload leaves no volume behind."""
    with _upload_lock(pool, name):
        vol = find_volume(pool, name)
        if vol is not None:
            if is_complete(vol, info):
                progress(f"volume {name}: already in pool {pool.name()}, reused")
                return vol, False
            progress(f"volume {name}: incomplete (an interrupted upload), uploading again")
            delete_volume(pool, name)
        # Created raw and empty: the stream writes the qcow2 file byte for byte; a qcow2
        # created by libvirt would leave its own header bytes inside the image's holes.
        vol = _create(pool, _volume_xml(name, info.size, "raw", owner, 0o644), name)
        try:
            head = _read_head(image, min(HEADER_BYTES, info.size))
            sent = send_sparse(vol, image, len(head), info.size, progress)
            # The header last, and not sparse: libvirt writes a hole at the end of a
            # stream by truncating the file there, which would cut off the body.
            send_bytes(vol, 0, head)
            sent += len(head)
            refresh(pool)  # libvirt probes the uploaded file again: qcow2, virtual size
            vol = pool.storageVolLookupByName(name)
        except BaseException:
            with contextlib.suppress(Exception):
                vol.delete(0)
            raise
        if not is_complete(vol, info):
            delete_volume(pool, name)
            raise die(f"volume {name}: the upload did not arrive whole")
    progress(f"volume {name}: uploaded {_mib(sent)} of data ({_mib(info.size)} image)")
    return vol, True


def _read_head(image: Path, size: int) -> bytes:
    try:
        with image.open("rb") as f:
            return f.read(size)
    except OSError as exc:
        raise die(f"cannot read {image}: {exc.strerror}") from None


@contextlib.contextmanager
def _upload_lock(pool: Any, name: str) -> Iterator[None]:
    """One upload of a volume at a time in this process (devices deployed in parallel
    may share a hypervisor's pool); the second finds the first's volume complete."""
    key = (pool.connect().getURI(), pool.UUIDString(), name)
    with _GUARD:
        lock = _UPLOADS.setdefault(key, threading.Lock())
    with lock:
        yield


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


class _SparseReader:
    """The callbacks of virStream.sparseSendAll over bytes START..END of a local file:
    data extents are read, holes are reported by length (SEEK_DATA/SEEK_HOLE)."""

    def __init__(
        self, fd: int, start: int, end: int, name: str, progress: Callable[[str], None]
    ) -> None:
        self.fd, self.end, self.name, self.progress = fd, end, name, progress
        os.lseek(fd, start, os.SEEK_SET)
        self.sent = 0
        self.next_report = time.monotonic() + PROGRESS_EVERY_S

    def section(self, _stream: Any, _opaque: Any) -> list[Any]:
        """[in data?, bytes until the section changes] at the current offset."""
        offset = os.lseek(self.fd, 0, os.SEEK_CUR)
        if offset >= self.end:
            return [False, 0]
        try:
            data = min(os.lseek(self.fd, offset, os.SEEK_DATA), self.end)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: only a hole up to the end
                raise
            data = self.end
        if data > offset:
            os.lseek(self.fd, offset, os.SEEK_SET)
            return [False, data - offset]
        hole = min(os.lseek(self.fd, offset, os.SEEK_HOLE), self.end)
        os.lseek(self.fd, offset, os.SEEK_SET)
        return [True, hole - offset]

    def read(self, _stream: Any, nbytes: int, _opaque: Any) -> bytes:
        data = os.read(self.fd, min(nbytes, CHUNK))
        self.sent += len(data)
        self._report()
        return data

    def skip(self, _stream: Any, length: int, _opaque: Any) -> int:
        os.lseek(self.fd, length, os.SEEK_CUR)
        self._report()
        return 0

    def _report(self) -> None:
        if time.monotonic() < self.next_report:
            return
        self.next_report = time.monotonic() + PROGRESS_EVERY_S
        done = os.lseek(self.fd, 0, os.SEEK_CUR)
        self.progress(
            f"volume {self.name}: {100 * done // max(self.end, 1)}% "
            f"({_mib(self.sent)} of data sent)"
        )


def send_sparse(
    vol: Any, image: Path, start: int, end: int, progress: Callable[[str], None]
) -> int:
    """Upload bytes START..END of the file into the volume at the same offset, as a
    sparse stream; the bytes of data sent."""
    libvirt = load_libvirt()
    name = vol.name()
    try:
        fd = os.open(image, os.O_RDONLY)
    except OSError as exc:
        raise die(f"cannot read {image}: {exc.strerror}") from None
    try:
        reader = _SparseReader(fd, start, end, name, progress)
        stream = vol.connect().newStream(0)
        try:
            flags = libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM
            vol.upload(stream, start, end - start, flags)
            stream.sparseSendAll(reader.read, reader.section, reader.skip, None)
            stream.finish()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise die(f"upload of {name} failed: {exc.get_error_message()}") from None
        return reader.sent
    finally:
        os.close(fd)


def create_overlay(pool: Any, name: str, base: Any, info: ImageInfo, owner: Owner) -> Any:
    """The node's qcow2 volume backed by the base volume (which it never writes)."""
    xml = _volume_xml(name, info.virtual_size, "qcow2", owner, 0o600, (base.path(), "qcow2"))
    return _create(pool, xml, name)


def upload_bytes(pool: Any, name: str, data: bytes, owner: Owner) -> Any:
    """A raw volume holding DATA (the seed ISO), readable by the node's QEMU only."""
    vol = _create(pool, _volume_xml(name, len(data), "raw", owner, 0o600), name)
    try:
        send_bytes(vol, 0, data)
    except BaseException:
        delete_volume(pool, name)
        raise
    return vol


def send_bytes(vol: Any, offset: int, data: bytes) -> None:
    """Write DATA into the volume at OFFSET, as a plain (not sparse) stream."""
    libvirt = load_libvirt()
    stream = vol.connect().newStream(0)
    try:
        vol.upload(stream, offset, len(data), 0)
        view = memoryview(data)
        while view:
            view = view[stream.send(bytes(view[:CHUNK])) :]
        stream.finish()
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        raise die(f"upload of {vol.name()} failed: {exc.get_error_message()}") from None


def download_tail(pool: Any, name: str, max_bytes: int) -> bytes:
    """The last MAX_BYTES of a volume, read over the connection (b"" if there is none):
    the node's console log, also from a hypervisor on another machine."""
    libvirt = load_libvirt()
    refresh(pool)
    vol = find_volume(pool, name)
    if vol is None:
        return b""
    _kind, capacity, _alloc = vol.info()
    offset = max(0, capacity - max_bytes)
    chunks: list[bytes] = []

    def keep(_stream: Any, data: bytes, _opaque: Any) -> int:
        chunks.append(data)
        return len(data)

    stream = pool.connect().newStream(0)
    try:
        vol.download(stream, offset, capacity - offset, 0)
        stream.recvAll(keep, None)
        stream.finish()
    except libvirt.libvirtError:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        return b""
    return b"".join(chunks)
