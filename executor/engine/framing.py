"""Length-prefixed pickles on raw pipes: the manager-worker wire, one write per message.

A frame is a 4-byte big-endian length and a pickle (protocol 5). Reading goes through
PipeFrameReader, which takes whatever one os.read() returned and yields the complete
messages in it, so a reader needs one system call per batch of messages, not two per
message as with multiprocessing.Connection.recv_bytes().
"""

from __future__ import annotations

import os
import pickle
import struct
from typing import Any

_HEADER = struct.Struct("!I")
_PROTOCOL = 5  # passed positionally: parsing a keyword argument costs more, on every message
_READ_SIZE = 64 * 1024


def frame(message: Any) -> bytes:
    """``message`` as one frame."""
    payload = pickle.dumps(message, _PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


def write_frame(fd: int, data: bytes) -> None:
    """Write all of ``data`` to a blocking pipe or file: one os.write, unless a signal (or
    a nearly full disk) cuts it short."""
    if not data:
        return
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view) :]


class PipeFrameWriter:
    """Frames to a non-blocking pipe, in order, never waiting for room.

    What the pipe takes now is written at once; the rest is kept and written by flush()
    when the pipe has room again (the caller watches for that while ``backlog``). A
    writer that waited instead could deadlock with a reader that is itself waiting for
    the writer to read its output.
    """

    __slots__ = ("_fd", "_unsent")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._unsent = bytearray()

    @property
    def backlog(self) -> bool:
        """Some bytes wait for room in the pipe."""
        return bool(self._unsent)

    def send(self, data: bytes) -> bool:
        """Write ``data`` or keep what does not fit; True when this starts a backlog.

        Raises OSError (the reader is gone: EPIPE) like os.write.
        """
        if self._unsent:
            self._unsent += data
            return False
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        if written == len(data):
            return False
        self._unsent += memoryview(data)[written:]
        return True

    def flush(self) -> bool:
        """Write what the pipe takes of the backlog; True while some is left."""
        try:
            written = os.write(self._fd, self._unsent)
        except BlockingIOError:
            return True
        del self._unsent[:written]
        return bool(self._unsent)

    def discard(self) -> None:
        """Forget the backlog (its reader is gone)."""
        self._unsent.clear()


class PipeFrameReader:
    """Cuts a byte stream into messages."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def empty(self) -> bool:
        """No partial frame is waiting for more bytes."""
        return not self._buffer

    def feed(self, data: bytes) -> list[Any]:
        """Add ``data``; return the messages completed by it, in order."""
        buffer = self._buffer
        chunk: bytes | bytearray = data
        if buffer:  # a frame was cut short: join the pieces (else read ``data`` in place)
            buffer += data
            chunk = buffer
        messages = []
        start, stop = 0, len(chunk)
        while stop - start >= 4:
            (size,) = _HEADER.unpack_from(chunk, start)
            end = start + 4 + size
            if stop < end:
                break
            messages.append(pickle.loads(memoryview(chunk)[start + 4 : end]))
            start = end
        if buffer:
            del buffer[:start]
        elif start < stop:
            buffer += memoryview(chunk)[start:]
        return messages


def read_message(fd: int, reader: PipeFrameReader, pending: list[Any]) -> Any:
    """The next message from a blocking pipe (``pending`` holds ones read ahead).

    Raises EOFError when the writer has closed the pipe.
    """
    while not pending:
        data = os.read(fd, _READ_SIZE)
        if not data:
            raise EOFError("the pipe was closed")
        pending.extend(reader.feed(data))
    return pending.pop(0)
