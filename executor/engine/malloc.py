"""glibc malloc settings for worker processes: keep freed memory for reuse.

By default glibc hands a freed block of 128 KiB or more straight back to the kernel
(raising that bound to the largest block freed so far) and trims the heap once 2x that
bound is free at its top. A task that handles values of a few MiB then pays, for every
value, the first touch of pages it had a moment ago, which on a virtual machine costs
more than copying the MiB itself (figures: docs/performance.md). A worker therefore
takes blocks below MMAP_THRESHOLD from the heap and keeps up to TRIM_THRESHOLD of freed
heap memory.
"""

from __future__ import annotations

import ctypes

from executor.services.sharedmem import load_libc

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Apply the settings to this process; False where the C library is not glibc."""
    libc = load_libc({"mallopt": [ctypes.c_int, ctypes.c_int]})
    if libc is None:
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
