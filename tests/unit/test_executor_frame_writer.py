"""PipeFrameWriter on a real pipe: it never blocks, keeps what the pipe cannot take, in
order, and writes it as the reader makes room."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from executor.engine.framing import PipeFrameReader, PipeFrameWriter, frame


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass  # closed by the test


def _drain(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return b"".join(chunks)
        chunks.append(data)


def test_what_fits_is_written_at_once(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    writer = PipeFrameWriter(write_fd)
    assert writer.send(frame("small")) is False
    assert not writer.backlog
    assert PipeFrameReader().feed(_drain(read_fd)) == ["small"]


def test_more_than_the_pipe_holds_is_kept_and_flushed_in_order(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    writer = PipeFrameWriter(write_fd)
    messages = [("task", i, "x" * 30_000) for i in range(8)]  # ~240 KB, the pipe holds 64 KiB
    assert writer.send(b"".join(frame(m) for m in messages[:7])) is True  # a backlog begins
    assert writer.backlog
    assert writer.send(frame(messages[7])) is False  # queued behind it, not written ahead
    reader, received = PipeFrameReader(), []
    for _ in range(100):
        received += reader.feed(_drain(read_fd))
        if not writer.flush():
            break
    received += reader.feed(_drain(read_fd))
    assert received == messages
    assert not writer.backlog
    assert writer.flush() is False  # nothing left: a no-op


def test_a_full_pipe_takes_nothing_and_loses_nothing(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    writer = PipeFrameWriter(write_fd)
    filler = b"f" * (1 << 20)
    assert writer.send(filler) is True
    assert writer.flush() is True  # still full: the flush writes nothing and says so
    data = frame("after")
    writer.send(data)
    received = bytearray()
    while writer.flush() or len(received) < len(filler) + len(data):
        received += _drain(read_fd)
    assert bytes(received) == filler + data


def test_a_gone_reader_raises_and_the_backlog_can_be_dropped(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    writer = PipeFrameWriter(write_fd)
    assert writer.send(b"b" * (1 << 18)) is True
    os.close(read_fd)
    with pytest.raises(BrokenPipeError):
        writer.flush()
    writer.discard()
    assert not writer.backlog
    with pytest.raises(BrokenPipeError):
        writer.send(b"late")
