"""A second mapping of a freshly created shared-memory table, as another process has
(shared by the counter table's and the wait board's unit tests)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def second_mapping(
    create: Callable[[], tuple[int, object]], view: Callable[[int], T]
) -> Iterator[T]:
    """Yield ``view(fd)`` of the memfd ``create()`` made; the creator's mapping and the
    descriptor live until the generator ends."""
    fd, owner = create()
    try:
        yield view(fd)
    finally:
        os.close(fd)
    del owner
