"""Worker side of the combined log: fds 1 and 2 and a log channel are pipes to the manager.

Redirecting the file descriptors (not just sys.stdout) catches everything a task writes:
print, os.write(1, ...), C code, and child processes, which inherit the descriptors.
The manager owns the read ends, so nothing is lost when a worker is killed; the worker
flushes every user-space buffer before it reports a task finished.
"""

from __future__ import annotations

import ctypes
import faulthandler
import fcntl
import io
import logging
import os
import sys
import termios

TASK_LOGGER = "executor.task"
# Large enough that printing many lines costs few system calls (see benchmarks/logcapture.py).
_STDOUT_BUFFER = 64 * 1024

try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None)
except OSError:  # pragma: no cover - a platform without a loadable C library
    _libc = None


def redirect_std_streams(out_fd: int, err_fd: int) -> None:
    """Point fds 1 and 2 at the capture pipes and rebuild sys.stdout/sys.stderr on them.

    stdout is block-buffered like any Python program writing to a pipe (line-buffered
    when PYTHONUNBUFFERED is set); stderr is line-buffered.
    """
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdout = _text_stream(1, _STDOUT_BUFFER, line_buffering=unbuffered)
    sys.stderr = _text_stream(2, io.DEFAULT_BUFFER_SIZE, line_buffering=True)
    # A segfaulting task leaves its Python traceback in its err stream.
    faulthandler.enable(file=sys.stderr, all_threads=False)


def _text_stream(fd: int, buffer_size: int, line_buffering: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    return io.TextIOWrapper(
        io.BufferedWriter(raw, buffer_size),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=line_buffering,
    )


def flush_std_streams() -> None:
    """Push out what the task left in Python's and C's stdio buffers."""
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass  # A task may close or replace the streams; what is gone is gone.
    if _libc is not None:
        _libc.fflush(None)


class _PipeHandler(logging.Handler):
    """Writes each formatted record as text lines to the worker's log pipe."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        """The log pipe of the task's capture slot (see CaptureSlots)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            while data:
                data = data[os.write(self.fd, data) :]
        except Exception:
            self.handleError(record)


def install_log_capture(fd: int) -> tuple[logging.Logger, _PipeHandler]:
    """Route logging records in this worker to the log pipe; return the ``ctx.log``
    logger and the handler.

    The handler sits on the root logger, so records of any library logger a task uses
    (WARNING and up, the root's default level) arrive too, tagged ``log``.
    """
    handler = _PipeHandler(fd)
    handler.setFormatter(logging.Formatter("%(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    task_logger = logging.getLogger(TASK_LOGGER)
    task_logger.setLevel(logging.DEBUG)
    return task_logger, handler


_NO_BYTES = bytes(4)  # FIONREAD's answer (a C int) when a pipe is empty


class CaptureSlots:
    """The worker's sets of capture pipes, ``(out, err, log)`` descriptors each.

    A task queued behind the running one starts the moment that one ends, before the
    manager has read the end of its output; writing to the other set keeps the two
    tasks' bytes apart, so every line is attributed to the task that wrote it.
    """

    def __init__(self, slots: tuple[tuple[int, int, int], ...]) -> None:
        self._slots = slots
        self._current = 0
        out, err, log = slots[0]
        redirect_std_streams(out, err)
        self.logger, self._handler = install_log_capture(log)

    def use(self, slot: int) -> None:
        """Send fds 1 and 2 and log records to ``slot`` (the streams are flushed)."""
        if slot != self._current:
            out, err, log = self._slots[slot]
            os.dup2(out, 1)
            os.dup2(err, 2)
            self._handler.fd = log
            self._current = slot

    def unread(self, slot: int) -> bool:
        """Whether any pipe of ``slot`` holds bytes the manager has not read yet.

        Asked after a task: when none does, the manager has already logged all the
        task wrote and skips draining the slot (three reads it would make per task).
        """
        try:
            return any(fcntl.ioctl(fd, termios.FIONREAD, _NO_BYTES) != _NO_BYTES
                       for fd in self._slots[slot])  # fmt: skip
        except OSError:  # the task closed a capture pipe: let the manager look
            return True
