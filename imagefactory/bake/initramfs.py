"""Reading an initramfs image: its files, and the machine each ELF file is built for.

An initramfs is one or more `newc` cpio archives, one after the other, the last usually
compressed (here zstd; gzip and xz are read too). mkinitramfs run with the host's tools
(bake/hosttools.py) must not have copied one of them in: `foreign_elves` finds any.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imagefactory.run import spawn

_NEWC = b"070701"
_HEADER = 110
_ZSTD = b"\x28\xb5\x2f\xfd"
_ELF = b"\x7fELF"


def _align4(n: int) -> int:
    return (n + 3) & ~3


def cpio_files(data: bytes, start: int = 0) -> tuple[list[tuple[str, int, bytes]], int]:
    """The (name, mode, contents) of one newc archive at `start`, and where it ends."""
    files: list[tuple[str, int, bytes]] = []
    at = start
    while True:
        header = data[at : at + _HEADER]
        if len(header) < _HEADER or header[:6] != _NEWC:
            raise ValueError(f"not a newc cpio header at offset {at}")
        fields = [int(header[i : i + 8], 16) for i in range(6, _HEADER, 8)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_at = at + _HEADER
        name = data[name_at : name_at + namesize - 1].decode("utf-8", "replace")
        body_at = _align4(name_at + namesize)
        at = _align4(body_at + size)
        if name == "TRAILER!!!":
            return files, at
        files.append((name, mode, data[body_at : body_at + size]))


def decompress(data: bytes) -> bytes:
    if data.startswith(_ZSTD):
        with tempfile.NamedTemporaryFile(prefix="fleetbake-initramfs-") as part:
            part.write(data)
            part.flush()
            proc = spawn(["zstd", "-d", "-c", "-q", part.name], stderr=subprocess.DEVNULL)
            out, _ = proc.communicate()
        if proc.returncode != 0:
            raise ValueError(f"zstd -d failed with exit code {proc.returncode}")
        return out
    if data.startswith(b"\x1f\x8b"):
        return gzip.decompress(data)
    if data.startswith(b"\xfd7zXZ"):
        return lzma.decompress(data)
    raise ValueError(f"unknown initramfs compression (starts with {data[:4].hex()})")


def files(image: bytes) -> Iterator[tuple[str, int, bytes]]:
    """Every file of every archive in the image."""
    at = 0
    while at < len(image):
        if image[at : at + 6] == _NEWC:
            found, at = cpio_files(image, at)
            yield from found
        elif image[at] == 0:
            at += 1  # padding between archives
        else:
            yield from files(decompress(image[at:]))
            return


def elf_machine(contents: bytes) -> int | None:
    """e_machine of an ELF file (either byte order), or None if it is not one."""
    if len(contents) < 20 or not contents.startswith(_ELF):
        return None
    order = "<" if contents[5] == 1 else ">"
    machine: int = struct.unpack_from(order + "H", contents, 18)[0]
    return machine


def foreign_elves(image: Path, machine: int) -> list[str]:
    """The image's ELF files built for another machine than `machine`."""
    return sorted(
        name
        for name, _, contents in files(image.read_bytes())
        if (found := elf_machine(contents)) is not None and found != machine
    )
