"""The one way to stop with a user error: a clear line, a hint, a non-zero exit."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A problem the user can fix. Printed as one `Error: ...` line, never a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} (hint: {hint})")
        self.hint = hint


def die(message: str, hint: str | None = None) -> UserError:
    """Build the error to raise: `raise die("no such target", hint="...")`."""
    return UserError(message, hint)
