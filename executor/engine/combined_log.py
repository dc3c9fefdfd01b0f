"""The combined log: one file, one line per record, ``<time> <source> <stream> <text>``.

Sources are ``executor`` or ``task:<id>``; streams ``out``, ``err`` or ``log``. The manager
is the only writer while a run is going; the agent appends its own executor lines before
and after a run by opening the same path again (lines are appended, never rewritten).

Task output arrives in chunks read from a worker's pipes. A LineSplitter per pipe keeps
the unfinished last line, so a line is always written whole and two tasks' bytes never
share one line. Every line of a chunk gets the chunk's arrival time. The file object has
a fixed-size buffer: memory stays bounded however much a task prints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

from executor.timefmt import rfc3339

EXECUTOR = "executor"
OUT, ERR, LOG = "out", "err", "log"

# A line longer than this is cut into several log lines rather than held in memory.
MAX_LINE = 64 * 1024
_BUFFER = 1024 * 1024


class CombinedLog:
    """Appends records to the combined log file at ``path`` (created with its parents)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("ab", buffering=_BUFFER)
        self.unflushed = False
        """True when records were written since the last flush()."""

    def executor(self, *texts: str, stream: str = LOG) -> None:
        """Write the executor's own records, stamped now (one line per line of text)."""
        if not texts:
            return
        prefix = f"{rfc3339(time.time())} {EXECUTOR} {stream} "
        lines = prefix + "\n".join(texts).replace("\n", "\n" + prefix) + "\n"
        self._file.write(lines.encode("utf-8", "backslashreplace"))
        self.unflushed = True

    def write(self, source: str, stream: str, text: bytes, when: float) -> None:
        """Write ``text`` (one or more lines, no trailing newline) stamped with ``when``."""
        prefix = f"{rfc3339(when)} {source} {stream} ".encode()
        clean = text.decode("utf-8", "backslashreplace").encode("utf-8")
        self._file.write(prefix + clean.replace(b"\n", b"\n" + prefix) + b"\n")
        self.unflushed = True

    def flush(self) -> None:
        self._file.flush()
        self.unflushed = False

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CombinedLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LineSplitter:
    """Cuts one pipe's byte stream into whole lines, keeping the unfinished tail."""

    __slots__ = ("stream", "_partial")

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self._partial = b""

    def feed(self, data: bytes) -> bytes:
        """Add ``data``; return the complete lines it finishes (newline-joined), or b""."""
        end = data.rfind(b"\n")
        if end < 0:
            self._partial += data
            if len(self._partial) < MAX_LINE:
                return b""
            complete, self._partial = self._partial, b""
            return complete
        complete = self._partial + data[:end]
        self._partial = data[end + 1 :]
        return complete

    def rest(self) -> bytes:
        """Return and forget the unfinished last line (at the end of a task)."""
        partial, self._partial = self._partial, b""
        return partial
