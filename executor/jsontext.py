"""JSON text that every later reader accepts: no NaN or infinities, no lone surrogates.

Python strings may hold lone surrogates (from `surrogateescape`, or a task that built
one), which UTF-8 cannot carry: writing them fails, and as `\\udXXX` escapes they are
refused by strict JSON parsers. They become U+FFFD, the replacement character.
"""

from __future__ import annotations

import json
from typing import Any


def scrub(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD (a split pair is joined)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def dumps(value: Any) -> str:
    """`value` as JSON text that encodes to UTF-8; ValueError for NaN or infinities."""
    return scrub(json.dumps(value, ensure_ascii=False, allow_nan=False))


def rescrub(text: str) -> str:
    """JSON text whose strings may escape lone surrogates (`"\\ud800"`), scrubbed."""
    return dumps(json.loads(text))
