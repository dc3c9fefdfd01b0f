"""How `imagefactory` stops on an error: one `Error: ...` line and a chosen exit code.

Exit codes (every command; `ssh NODE -- CMD` passes on the remote command's instead):

    0    success
    1    the work failed: a node or its run (`boot`), a required host check (`doctor`)
    2    a user error: bad usage, or a problem the user can fix (`die(...)`)
    4    the host failed under a command: a tool it ran (`HostError`) or a file it
         could not read or write; the same code as `executor`'s, whose 3 is taken
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import click

from imagefactory.run import CommandError

EXIT_HOST = 4
EXIT_INTERRUPTED = 130


class UserError(click.ClickException):
    """A problem the user can fix. Printed as one `Error: ...` line, never a traceback."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message if hint is None else f"{message} (hint: {hint})")
        self.hint = hint


def die(message: str, hint: str | None = None) -> UserError:
    """Build the error to raise: `raise die("no such target", hint="...")`."""
    return UserError(message, hint)


class HostError(click.ClickException):
    """A command that failed or an OS error that no step turned into a user error: `Error:`
    naming the command and its exit code (then the tail of its output) or the file."""

    exit_code = EXIT_HOST

    @classmethod
    def of(cls, exc: CommandError | OSError) -> HostError:
        if isinstance(exc, CommandError):
            return cls(exc.message())
        files = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        return cls(f"{files}: {exc.strerror}" if files and exc.strerror else str(exc))
