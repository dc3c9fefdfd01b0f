"""The wire between store/events clients and the run's services process.

    worker or manager process                    services process (one per run)
    -------------------------                    ------------------------------
    Store / Events ──call(request, blobs)──► Connection ══AF_UNIX══► epoll loop
                   ◄──reply (Ok|Got|Counted|Tables|Err|Pending|Timeout)══ ├─ StoreTable
                   ◄──Event(sid, value|None=ended)═══════════════════     └─ TopicBoard
                   ◄──Spare() + memfds of replaced store values═══

A frame is `<u32 length><u8 fd count>` followed by a pickled message (protocol.py: a
typed message travels as a plain tuple). Values travel as `Blob`s: a small value as its
inline pickle; a value whose pickle reaches BIG_VALUE bytes as a memfd passed with
SCM_RIGHTS (memfd_values.py: sealed for event payloads, recycled for store values), so
it is copied once into shared memory and once out of it, and the services process holds
only the file descriptor. A connection's reply bookkeeping is replies.py. The socket
lives in a private 0700 directory, so only the run's own processes can reach it.
"""

from __future__ import annotations

import array
import functools
import os
import pickle
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast, get_args

from executor.contention import SPIN_S, Contention, spin_poll
from executor.services import memfd_values
from executor.services.board import ParkedWait
from executor.services.memfd_values import Spares
from executor.services.protocol import (
    UNWAIT,
    Enc,
    Err,
    Event,
    MemfdRef,
    Message,
    Ok,
    Pending,
    Reply,
    Request,
    Spare,
    typed,
)
from executor.services.replies import ReplyLedger

BIG_VALUE = 64 * 1024
"""Pickles of at least this many bytes travel in a memfd instead of the socket."""

_HEADER = struct.Struct("<IB")
_RECV_SIZE = 128 * 1024
_MAX_FDS = 8
_ANC_SIZE = socket.CMSG_SPACE(_MAX_FDS * array.array("i").itemsize)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
_CTRUNC = int(socket.MSG_CTRUNC)

Hook = Callable[[], None]
R = TypeVar("R")


@dataclass(slots=True)
class Blob:
    """One encoded value: an inline pickle, or a descriptor of a memfd."""

    enc: Enc
    """Inline pickle bytes, or where a memfd value lies in its memfd."""
    fd: int = -1
    """The memfd holding the value (only for memfd values), owned by this Blob."""

    @property
    def size(self) -> int:
        """The value's encoded bytes."""
        enc = self.enc
        return len(enc) if isinstance(enc, bytes) else enc.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ServiceError(RuntimeError):
    """The services process failed a request, or is gone."""


def encode(value: object, spares: Spares | None = None) -> Blob:
    """Serialize `value`; a big one goes to a memfd (bytes are written to it as is).

    With `spares` (store values), the memfd may be a spare and is not sealed: readers
    load it with `load` (see executor/services/memfd_values.py).
    """
    # exact types only: a subclass must keep its class, so it goes through pickle
    if isinstance(value, bytes | bytearray) and type(value) in (bytes, bytearray):
        if len(value) >= BIG_VALUE:
            return _in_memfd(type(value).__name__, len(value), (), [value], spares)
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    try:
        raws = [buffer.raw() for buffer in buffers]
    except BufferError:  # a non-contiguous out-of-band buffer: keep it in-band
        raws, data = [], pickle.dumps(value, protocol=5)
    size = len(data) + sum(raw.nbytes for raw in raws)
    if size < BIG_VALUE:
        return Blob(pickle.dumps(value, protocol=5) if raws else data)
    layout = (len(data), *(raw.nbytes for raw in raws))
    return _in_memfd("pickle", size, layout, [data, *raws], spares)


def _in_memfd(
    kind: str, size: int, layout: tuple[int, ...], parts: list[Any], spares: Spares | None
) -> Blob:
    if spares is None:
        return Blob(MemfdRef(kind, size, layout, 0), memfd_values.sealed(parts))
    fd, generation = memfd_values.recyclable(parts, size, spares)
    return Blob(MemfdRef(kind, size, layout, generation), fd)


def decode(blob: Blob) -> Any:
    """Rebuild the value of `blob` (its memfd stays open)."""
    enc = blob.enc
    if isinstance(enc, bytes):
        return pickle.loads(enc)
    return _rebuild(enc, _copy(enc, blob.fd))


def _copy(ref: MemfdRef, fd: int) -> bytes | bytearray:
    """The bytes of a memfd value."""
    if ref.kind == "bytes":
        return memfd_values.read_bytes(fd, ref.size)
    buf = bytearray(ref.size)
    memfd_values.read_into(fd, buf)
    return buf


def _rebuild(ref: MemfdRef, data: bytes | bytearray) -> Any:
    if ref.kind in ("bytes", "bytearray"):
        return data
    layout = ref.layout
    view = memoryview(data)
    head, pos, buffers = layout[0], layout[0], []
    for length in layout[1:]:
        buffers.append(view[pos : pos + length])
        pos += length
    return pickle.loads(view[:head], buffers=buffers)


def same_value(a: Blob, b: Blob) -> bool:
    """Equality of two stored values: `==` on the values, or their bytes if they cannot load."""
    if isinstance(a.enc, bytes) and a.enc == b.enc:
        return True
    try:
        return bool(decode(a) == decode(b))
    except Exception:  # a class the services process cannot import, or an odd __eq__
        return a.enc == b.enc and _raw(a) == _raw(b)


def take(enc: Enc, fds: deque[int]) -> Blob:
    """Pair an encoding from a message with its memfd from the frame's descriptors."""
    if isinstance(enc, bytes):
        return Blob(enc)
    if not fds:
        raise ServiceError("protocol error: a memfd value arrived without its descriptor")
    return Blob(enc, fds.popleft())


def load(enc: Enc, fds: deque[int]) -> Any:
    """Decode an encoding from a reply and release its memfd.

    Raises Recycled when a store value's memfd holds a newer value by now (ask again).
    """
    if isinstance(enc, bytes):  # the common case, kept short: an inline pickle
        return pickle.loads(enc)
    blob = take(enc, fds)
    try:
        return load_held(blob)
    finally:
        blob.close()


def load_held(blob: Blob) -> Any:
    """Decode a value from a reply, keeping its memfd open (raises Recycled)."""
    enc = blob.enc
    if isinstance(enc, bytes):
        return pickle.loads(enc)
    data = memfd_values.read(blob.fd, enc.generation, functools.partial(_copy, enc, blob.fd))
    return _rebuild(enc, data)


def pack(msg: Message, nfds: int) -> bytes:
    """A frame of ``msg`` (as a plain tuple, see protocol.py) for ``nfds`` descriptors."""
    body = pickle.dumps(msg[:], protocol=5)  # [:] of a NamedTuple: a plain tuple
    return _HEADER.pack(len(body), nfds) + body


def expect(kind: type[R], reply: Message) -> R:
    """``reply`` as the answer of class ``kind`` a request has (ServiceError if not)."""
    if type(reply) is not kind:
        raise ServiceError(f"protocol error: {type(reply).__name__} instead of {kind.__name__}")
    answer: R = reply
    return answer


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that passes `fds` (SCM_RIGHTS), or nothing."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def send_now(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int]) -> int:
    """Send what the socket takes without blocking, with `fds` on the first byte; the count."""
    try:
        if fds:
            return sock.sendmsg([data], rights(fds), _SEND_FLAGS)
        return sock.send(data, _SEND_FLAGS)
    except BlockingIOError:
        return 0


class SocketFrameReader:
    """Reassembles frames from a byte stream and pairs them with their descriptors."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._fds: deque[int] = deque()
        # reused: a fresh big buffer for every read would cost page faults
        self._received = memoryview(bytearray(_RECV_SIZE))

    def fill(self, sock: socket.socket) -> bool:
        """Read what `sock` has (blocking if it is a blocking socket); False at EOF."""
        size, ancdata, flags, _ = sock.recvmsg_into([self._received], _ANC_SIZE, _RECV_FLAGS)
        self._buf += self._received[:size]
        if ancdata:
            fds = array.array("i")
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
            self._fds.extend(fds)
        if flags & _CTRUNC:
            raise ServiceError("protocol error: too many descriptors in one message")
        return size > 0

    @property
    def partial(self) -> bool:
        """Part of a frame was read; the rest is still to come."""
        return bool(self._buf)

    def next(self) -> tuple[Message, deque[int]] | None:
        buf = self._buf
        if len(buf) < 5:  # _HEADER.size
            return None
        length, nfds = _HEADER.unpack_from(buf)
        end = _HEADER.size + length
        if len(buf) < end:
            return None
        try:
            msg = typed(pickle.loads(buf[_HEADER.size : end]))
        except Exception as exc:
            raise ServiceError(f"protocol error: an unreadable frame ({exc})") from None
        del buf[:end]
        if not nfds:
            return msg, deque()
        if len(self._fds) < nfds:
            raise ServiceError("protocol error: a frame arrived without its descriptors")
        return msg, deque(self._fds.popleft() for _ in range(nfds))

    def close(self) -> None:
        self._received.release()
        while self._fds:
            os.close(self._fds.popleft())


_REPLIES: frozenset[type[Message]] = frozenset(get_args(Reply))
"""The frames that answer a request; the others come between replies: subscription
payloads (Event) and spares (Spare, see memfd_values.py)."""


def close_all(fds: deque[int]) -> None:
    while fds:
        os.close(fds.popleft())


_ERRORS: dict[str, type[Exception]] = {
    "KeyError": KeyError,
    "TypeError": TypeError,
    "ValueError": ValueError,
}


def error_reply(exc: Exception) -> Err:
    arg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return Err(type(exc).__name__, arg)


_forks = 0  # bumped in every forked child: a client made before the fork is not its own


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class Connection:
    """One client connection to the services process, for one process only.

    Requests are serialized by a lock (one thread at a time; a thread blocked in
    `wait` holds it). Sends never block: what the socket does not take at once goes
    to a backlog that a helper thread, started only when needed, drains in order.
    """

    def __init__(self, address: str) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
        except OSError as exc:
            sock.close()
            raise ServiceError(f"cannot reach the run's services at {address}: {exc}") from None
        self._sock = sock
        self._pid = os.getpid()
        self._fork = _forks
        self._calls = threading.Lock()
        self._send_lock = threading.Lock()
        self._sending = threading.Condition(self._send_lock)  # wakes the flusher
        self._backlog: deque[tuple[memoryview, list[int]]] = deque()
        self._flusher: threading.Thread | None = None
        self._reader = SocketFrameReader()
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)
        self._queues: dict[int, deque[Blob]] = {}
        self._ledger = ReplyLedger()
        self.unsettled = False
        """Requests without an answer were sent since the last answer: the services
        apply each connection's requests in order, so an answer settles all before it."""
        self._closed = False
        self._contention = Contention()
        self.spares = Spares(self._read_arrived)
        """Memfds of store values this connection's requests replaced, to write into."""

    def __reduce__(self) -> Any:
        raise TypeError("a services client cannot be pickled: pass the address, call connect()")

    def call(
        self,
        msg: Request,
        blobs: Sequence[Blob] = (),
        on_block: Hook | None = None,
        on_unblock: Hook | None = None,
        lock_timeout: float = -1,
        parked: ParkedWait | None = None,
        spin: bool = True,
    ) -> tuple[Reply, deque[int]]:
        """Send a request and return its final reply (and the reply's descriptors).

        A `Pending` reply means the server parked the request: `on_block` runs, the
        final reply is awaited, then `on_unblock` runs. With `parked` (for a wait), a
        payload a publisher hands off through the wait board (board.py) that comes
        first is the reply, ``Ok(pickle)``. An `Err` reply is raised. Without `spin`
        the caller sleeps until the first reply (see `_next_reply`). Raises
        ServiceError when another thread keeps the connection for longer than
        `lock_timeout` seconds (if given).
        """
        if self._fork != _forks or self._closed:
            self._refuse(blobs)
        if not self._calls.acquire(timeout=lock_timeout):
            for blob in blobs:
                blob.close()
            raise ServiceError("the services connection is held by another thread")
        ledger = self._ledger
        try:
            if ledger.unwait_first():
                self._abandon()  # the services answer it now if it is still parked
            if ledger.owed:
                self._settle()
            self._send(msg, blobs)
            ledger.sent()
            try:
                reply, fds = self._next_reply(spin)
                if type(reply) is not Pending:
                    ledger.answered()
                else:
                    ledger.parked()
                    if on_block is not None:
                        on_block()
                    try:
                        got = self._next_reply() if parked is None else self._either(parked)
                        if isinstance(got, bytes):
                            ledger.handed_off()  # its answer is skipped at the next call
                            reply, fds = Ok(got), deque()
                        else:
                            reply, fds = got
                            ledger.answered()
                    finally:
                        if on_unblock is not None:
                            on_unblock()
            except BaseException:
                if ledger.abandoned():
                    self._abandon()
                raise
            finally:
                if ledger.end():
                    self.unsettled = False
        finally:
            self._calls.release()
        if type(reply) is Err:
            close_all(fds)
            raise _ERRORS.get(reply.error, ServiceError)(reply.message)
        return reply, fds

    @property
    def congested(self) -> bool:
        """The socket is full: sent requests wait in the backlog."""
        return bool(self._backlog)

    def cast(self, msg: Request, blobs: Sequence[Blob] = ()) -> None:
        """Send a request that has no reply; never blocks."""
        if self._fork != _forks or self._closed:
            self._refuse(blobs)
        self._send(msg, blobs)
        self.unsettled = True

    def open_queue(self, sid: int) -> None:
        self._queues[sid] = deque()

    def close_queue(self, sid: int) -> None:
        for blob in self._queues.pop(sid, ()):
            blob.close()

    def next_event(
        self, sid: int, timeout: float | None, on_block: Hook, on_unblock: Hook
    ) -> Blob | None:
        """The next payload of subscription `sid`, or None on timeout.

        Raises EOFError once the subscription is closed or the services are gone.
        """
        if self._fork != _forks or self._closed:
            self._refuse(())
        with self._calls:
            queue = self._queues.get(sid)
            if queue is None:
                raise EOFError("subscription closed")
            if queue or timeout == 0:
                return queue.popleft() if queue else None
            deadline = None if timeout is None else time.monotonic() + timeout
            on_block()
            try:
                while not queue:
                    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                    frame = self._read_frame(remaining)
                    if frame is None:
                        return None
                    self._route(*frame)
                    if sid not in self._queues:
                        raise EOFError("subscription closed")
            except ServiceError:
                raise EOFError("the run's services stopped") from None
            finally:
                on_unblock()
            return queue.popleft()

    def close(self) -> None:
        """Flush the backlog (up to 5 s) and close; idempotent."""
        with self._sending:
            if self._closed:
                return
            self._closed = True
            self._sending.notify_all()
        if self._flusher is not None and self._fork == _forks:
            self._flusher.join(5.0)
        self._sock.close()
        self._reader.close()
        for sid in list(self._queues):
            self.close_queue(sid)
        self.spares.close()

    def _refuse(self, blobs: Sequence[Blob]) -> None:
        """Raise for a client used after a fork or after close (releasing `blobs`)."""
        for blob in blobs:
            blob.close()
        if self._closed:
            raise ServiceError("this services client is closed")
        raise ServiceError(
            f"this services client belongs to process {self._pid}; "
            "call executor.services.server.connect(address) in each worker process"
        )

    def _send(self, msg: Message, blobs: Sequence[Blob]) -> None:
        fds = [blob.fd for blob in blobs if blob.fd >= 0] if blobs else []
        data = pack(msg, len(fds))
        with self._send_lock:
            sent = 0
            if not self._backlog:
                try:
                    sent = send_now(self._sock, data, fds)
                except OSError as exc:
                    for blob in blobs:
                        blob.close()
                    raise ServiceError(f"the run's services are gone: {exc}") from None
            if sent:
                for blob in blobs:
                    blob.close()  # the kernel passed its own copies of the descriptors
                if sent == len(data):
                    return
            else:
                for blob in blobs:
                    blob.fd = -1  # the backlog owns the descriptors now
            self._backlog.append((memoryview(data)[sent:], [] if sent else fds))
            if self._flusher is None:
                self._flusher = threading.Thread(
                    target=self._drain, name="executor-services-send", daemon=True
                )
                self._flusher.start()
            self._sending.notify_all()

    def _drain(self) -> None:
        while True:
            with self._sending:
                while not self._backlog and not self._closed:
                    self._sending.wait()
                if not self._backlog:
                    return
                view, fds = self._backlog[0]
                try:
                    sent = send_now(self._sock, view, fds)
                except OSError:
                    sent = -1
                if sent < 0 or sent == len(view):
                    self._backlog.popleft()
                    for fd in fds:
                        os.close(fd)
                elif sent:
                    self._backlog[0] = (view[sent:], [])
                    for fd in fds:
                        os.close(fd)
            if sent == 0:
                select.select([], [self._sock], [], 0.5)

    def _abandon(self) -> None:
        """After an interrupted call: free a parked wait; its reply is skipped later."""
        try:
            self._send(UNWAIT, ())
        except ServiceError:
            pass

    def _settle(self) -> None:
        """Skip the replies still due to interrupted calls."""
        ledger = self._ledger
        while ledger.owed:
            reply, fds = self._next_reply()
            close_all(fds)
            ledger.skipped(reply)

    def _next_reply(self, spin: bool = False) -> tuple[Reply, deque[int]]:
        """The next message that is not a subscription payload (those are queued).

        With ``spin``, look for it without sleeping first, while the CPUs are quiet:
        the services process usually answers sooner than a wake-up would take.
        """
        reader = self._reader
        while True:
            frame = reader.next()
            if frame is None:
                if spin and self._contention.quiet():
                    spin_poll(self._poll.poll, SPIN_S)
                    spin = False
                self._receive()
            elif type(frame[0]) in _REPLIES:
                return cast(Reply, frame[0]), frame[1]
            else:
                self._route(*frame)

    def _either(self, parked: ParkedWait) -> tuple[Reply, deque[int]] | bytes:
        """The services' answer to a parked wait, or a payload handed off through the
        wait board if that comes first. The services ring the slot's bell when they
        send this connection anything, so sleeping on the bell misses neither."""
        parked.park()
        reader = self._reader
        try:
            while True:
                frame = reader.next()
                if frame is None:
                    payload = parked.taken()
                    if payload is not None:
                        return payload  # the publisher kept the slot's token
                    if reader.partial or self._poll.poll(0):
                        self._receive()  # the rest of a frame may come without a bell
                    else:
                        parked.sleep()
                elif type(frame[0]) in _REPLIES:
                    parked.unpark()
                    return cast(Reply, frame[0]), frame[1]
                else:
                    self._route(*frame)
        except BaseException:
            parked.unpark()  # interrupted: no publisher may fill the slot from now on
            raise

    def _read_arrived(self) -> None:
        """Take in the frames that have arrived between calls (spares, subscription
        payloads), without waiting; nothing if another thread holds the connection."""
        if self._fork != _forks or self._closed or not self._calls.acquire(blocking=False):
            return
        try:
            while (frame := self._read_frame(0)) is not None:
                self._route(*frame)
        except ServiceError:
            return  # gone: the next call says so
        finally:
            self._calls.release()

    def _route(self, msg: Message, fds: deque[int]) -> None:
        """Take in a frame that is no reply to the current call."""
        if type(msg) is Spare:
            while fds:
                self.spares.add(fds.popleft())
            return
        if type(msg) is not Event:
            close_all(fds)
            if type(msg) not in _REPLIES:
                raise ServiceError(f"protocol error: a {type(msg).__name__} from the services")
            self._ledger.skipped(msg)  # a reply due to an interrupted call
            return
        if msg.enc is None:
            return  # the end of an unsubscribed subscription: it only wakes its reader
        blob = take(msg.enc, fds)
        queue = self._queues.get(msg.sid)
        if queue is None:
            blob.close()  # a payload for a subscription closed meanwhile
        else:
            queue.append(blob)

    def _read_frame(self, timeout: float | None) -> tuple[Message, deque[int]] | None:
        while (frame := self._reader.next()) is None:
            if timeout is not None and not self._poll.poll(timeout * 1000):
                return None
            self._receive()
        return frame

    def _receive(self) -> None:
        """Read what the socket has into the frame reader (blocking)."""
        try:
            alive = self._reader.fill(self._sock)
        except OSError as exc:
            raise ServiceError(f"the run's services are gone: {exc}") from None
        if not alive:
            raise ServiceError("the run's services closed the connection")


def _raw(blob: Blob) -> bytes:
    if isinstance(blob.enc, bytes):
        return blob.enc
    return memfd_values.read_bytes(blob.fd, blob.enc.size)
