"""Render `/etc/executor/node.env`: one `KEY="value"` line per variable
(docs/reference/environment.md).

Inside double quotes, `\\`, `"`, `$` and `` ` `` are escaped with a backslash, which is
exactly what both `sh` (`. node.env`) and systemd's `EnvironmentFile=` undo, so the two
read the same values. A line break cannot be written that way on one line, so values
with one are refused when the seed is made.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from imagefactory.errors import die

KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPED = re.compile(r'([\\"$`])')
# systemd treats \r as a line break too, and NUL cannot live in an environment at all.
_FORBIDDEN = {"\n": "a newline", "\r": "a carriage return", "\0": "a NUL character"}


def check_key(key: str) -> str:
    """A variable name both sh and systemd accept, or a user error."""
    if not KEY_RE.match(key):
        raise die(
            f"invalid variable name {key!r}",
            hint="use letters, digits and underscores, not starting with a digit",
        )
    return key


def check_value(key: str, value: str) -> str:
    """A value that fits on one node.env line, or a user error naming the variable."""
    if not _is_text(value):
        raise die(
            f"the value of {key} is not UTF-8 text",
            hint="node.env is UTF-8; pass the value in a UTF-8 locale, without raw bytes",
        )
    for char, name in _FORBIDDEN.items():
        if char in value:
            raise die(
                f"the value of {key} contains {name}",
                hint="node.env holds one line per variable; pass the value without line breaks",
            )
    return value


def _is_text(value: str) -> bool:
    """False for strings holding lone surrogates: bytes that were not UTF-8 on the command
    line (Python decodes them with surrogateescape)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def quote(value: str) -> str:
    """The double-quoted, escaped form of `value`."""
    return '"' + _ESCAPED.sub(r"\\\1", value) + '"'


def render(pairs: Iterable[tuple[str, str]]) -> str:
    """The file's text: validated `KEY="value"` lines in the given order."""
    lines = [f"{check_key(k)}={quote(check_value(k, v))}\n" for k, v in pairs]
    return "".join(lines)


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a `K=V` command-line pair (the value may itself contain `=`)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise die(f"--env {text!r} is not of the form KEY=VALUE")
    return check_key(key), check_value(key, value)
