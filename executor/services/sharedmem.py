"""What the wait board and the counter table share: glibc through ctypes, a memfd mapped
with its address known to C, and 16-byte digests that name keys and topics."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
from typing import Any

DIGEST_SIZE = 16


def load_libc(argtypes: dict[str, list[Any]]) -> ctypes.CDLL | None:
    """A private handle on the C library with these functions' argument types set, or
    None when one of them is missing (not glibc, or too old)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for name, types in argtypes.items():
            getattr(libc, name).argtypes = types
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return None
    return libc


def map_memfd(fd: int, size: int) -> tuple[mmap.mmap, int]:
    """Map ``size`` bytes of the memfd ``fd`` read-write; the map and its address.

    The map stays open for the life of the process: C code holds pointers into it.
    """
    mapped = mmap.mmap(fd, size)
    return mapped, ctypes.addressof(ctypes.c_char.from_buffer(mapped))


@functools.lru_cache(maxsize=1024)
def digest(text: str) -> bytes:
    """DIGEST_SIZE bytes naming ``text`` (any str; the same in every process)."""
    data = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()
