"""The combined log: one file, one line per record, ``<time> <source> <stream> <text>``.

Sources are ``executor`` or ``task:<id>``; streams ``out``, ``err`` or ``log``. The manager
is the only writer while a run is going; the agent appends its own executor lines before
and after a run by opening the same path again (lines are appended, never rewritten).

Task output arrives in chunks read from a worker's pipes. A LineSplitter per pipe keeps
the unfinished last line, so a line is always written whole and two tasks' bytes never
share one line. Every line of a chunk gets the chunk's arrival time. Records wait in a
fixed-size buffer: memory stays bounded however much a task prints.

A log that cannot be written (a full or read-only disk) never stops the run: the records
are dropped, the file is cut back to its last whole line, writing is tried again a second
later, and the first line that gets through says how many bytes were lost. truncation()
tells the caller (the agent) afterwards why the log is incomplete.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from contextlib import suppress
from pathlib import Path
from types import TracebackType

from executor.engine.framing import write_frame
from executor.timefmt import rfc3339

EXECUTOR = "executor"
OUT, ERR, LOG = "out", "err", "log"

# A line longer than this is cut into several log lines rather than held in memory.
MAX_LINE = 64 * 1024
_BUFFER = 1024 * 1024
# After a failed write, records are dropped for this long before writing is tried again.
RETRY_S = 1.0

log = logging.getLogger("executor.engine.combined_log")
_truncated: dict[Path, str] = {}


def truncation(path: str | os.PathLike[str]) -> str | None:
    """Why the combined log at ``path`` lost records in this process, or None if it did not."""
    return _truncated.get(Path(path).absolute())


class CombinedLog:
    """Appends records to the combined log file at ``path`` (created with its parents).

    Only opening the file can raise OSError: what cannot be written later is counted and
    reported instead."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._pending = bytearray()
        self._lost = 0
        """Bytes dropped since the last successful write."""
        self._retry_at = 0.0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o666)
        self._size = os.fstat(self._fd).st_size
        """The file's length after our last whole write: a partial write is cut back to it."""

    @property
    def unflushed(self) -> bool:
        """True when records wait to be written (the caller arranges a flush soon)."""
        return bool(self._pending)

    def executor(self, *texts: str, stream: str = LOG) -> None:
        """Write the executor's own records, stamped now (one line per line of text)."""
        if not texts:
            return
        prefix = f"{rfc3339(time.time())} {EXECUTOR} {stream} "
        lines = prefix + "\n".join(texts).replace("\n", "\n" + prefix) + "\n"
        self._add(lines.encode("utf-8", "backslashreplace"))

    def write(self, source: str, stream: str, text: bytes, when: float) -> None:
        """Write ``text`` (one or more lines, no trailing newline) stamped with ``when``."""
        prefix = f"{rfc3339(when)} {source} {stream} ".encode()
        clean = text.decode("utf-8", "backslashreplace").encode("utf-8")
        self._add(prefix + clean.replace(b"\n", b"\n" + prefix) + b"\n")

    def flush(self) -> None:
        self._drain(time.monotonic())

    def close(self) -> None:
        if self._fd < 0:
            return  # closed already
        self._drain(float("inf"))  # a last try, to write the mark of what was lost
        fd, self._fd = self._fd, -1
        os.close(fd)

    def _add(self, record: bytes) -> None:
        if time.monotonic() < self._retry_at:
            self._lost += len(record)
            return
        self._pending += record
        if len(self._pending) >= _BUFFER:
            self.flush()

    def _drain(self, clock: float) -> None:
        if clock < self._retry_at or not (self._pending or self._lost):
            return
        records = bytes(self._pending)
        self._pending.clear()
        data = records
        if self._lost:
            reason = _truncated.get(self.path.absolute(), "")
            mark = f"[{self._lost} bytes of the combined log lost: {reason}]"
            data = f"{rfc3339(time.time())} {EXECUTOR} err {mark}\n".encode() + records
        try:
            write_frame(self._fd, data)
        except OSError as exc:
            with suppress(OSError):  # a half-written line would garble the next one
                os.ftruncate(self._fd, self._size)
            self._lost += len(records)
            self._failed(exc)
            self._retry_at = time.monotonic() + RETRY_S
            return
        self._size += len(data)
        self._lost = 0

    def _failed(self, exc: OSError) -> None:
        key = self.path.absolute()
        if key not in _truncated:
            log.error("cannot write the combined log %s: %s (the run goes on)", self.path, exc)
        _truncated.setdefault(key, exc.strerror or os.strerror(exc.errno or errno.EIO))

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
