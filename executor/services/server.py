"""The run's services process: one server for the shared store and the events.

    manager process                              services process (-m executor.services.server)
    ───────────────                              ──────────────────────────────────────────────
    RunServices.start() ─ binds the socket, ───► epoll loop, single thread:
                          spawns the server        listening socket ─► one _Peer per client
    RunServices.publisher() ─ Events ──────────►   StoreTable (store.py), TopicBoard (events.py)
    worker: connect(address) ─ Store, Events ──►   stdin pipe: EOF = the manager is gone

The manager binds the listening socket before it starts the server, so clients can
connect at once. The server is a fresh interpreter (not a fork), so it works with
every multiprocessing start method, and it exits when its stdin (a pipe from the
manager) hits EOF, when it is re-parented (the manager died), or on SIGTERM; on exit
it removes the socket directory. It reads EXECUTOR_FASTPATHS (executor.settings) for
the run: off, it makes no counter table and no wait board and recycles no memfds, and
its clients, which learn of that when they connect, go the long way.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Hashable
from types import FrameType

from executor.contention import SPIN_S, Contention, spin_poll
from executor.interpreter import child_env
from executor.services import board
from executor.services.events import EVENT_REQUESTS, Events, TopicBoard
from executor.services.protocol import PING, SPARE, AskBoard, Err, Message, Ok, Ping, Put
from executor.services.store import STORE_REQUESTS, Store, StoreTable
from executor.services.wire import (
    Blob,
    Connection,
    ServiceError,
    SocketFrameReader,
    close_all,
    error_reply,
    pack,
    send_now,
)
from executor.settings import SettingsError, fastpaths_on

_SOCKET_NAME = "services.sock"
_PARENT_CHECK_S = 1.0
_STOP_GRACE_S = 5.0
_CONTROL_FD = 0  # the server's stdin: a pipe from the manager


def connect(address: str) -> tuple[Store, Events]:
    """A worker's clients for the run's store and events (one connection, this process only)."""
    conn = Connection(address)
    return Store(conn), Events(conn)


class RunServices:
    """Starts, addresses and stops the services process of one run (in the manager)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner = os.getpid()
        self._clients: list[Connection] = []

    def __enter__(self) -> RunServices:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The socket path workers pass to `connect()`."""
        if self._dir is None:
            raise ServiceError("the run's services are not started")
        return os.path.join(self._dir, _SOCKET_NAME)

    @property
    def pid(self) -> int | None:
        """The services process id while it runs."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start the services process; returns once it answers.

        Raises ServiceError, also for an invalid EXECUTOR_FASTPATHS (one line).
        """
        if self._proc is not None:
            raise ServiceError("the run's services are already started")
        try:
            fastpaths_on()  # the services process reads the same environment
        except SettingsError as exc:
            raise ServiceError(str(exc)) from None
        self._dir = tempfile.mkdtemp(prefix=f"executor-{_slug(self.run_id)}-", dir=_socket_base())
        try:
            self._spawn()
            probe = Connection(self.address)
            try:
                probe.call(PING)
            finally:
                probe.close()
        except ServiceError:
            code = self._proc.wait() if self._proc is not None else None
            self.stop()
            raise ServiceError(f"the run's services exited at start (code {code})") from None
        except BaseException:
            self.stop()
            raise

    def _spawn(self) -> None:
        """Bind the socket here (clients may connect at once), then start the server on it."""
        sock_dir = os.path.dirname(self.address)  # the server removes it when it exits
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(self.address)
            listener.listen(socket.SOMAXCONN)
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "executor.services.server",
                    str(listener.fileno()),
                    sock_dir,
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                pass_fds=(listener.fileno(),),
                env=child_env(),
                # Same session as the manager: a new one is a new scheduler autogroup, which
                # measurably worsened wake-up tails. Terminal SIGINT is ignored by the server.
                start_new_session=False,
            )

    def publisher(self) -> Events:
        """A new Events client for the manager: publishes reserved topics without blocking.

        Each call opens its own connection; use one per thread.
        """
        conn = Connection(self.address)
        self._clients.append(conn)
        return Events(conn, engine=True)

    def stop(self) -> None:
        """Flush the publishers, stop the services process, remove the socket; idempotent."""
        if os.getpid() != self._owner:
            return  # a forked child's copy: the run belongs to the manager
        for conn in self._clients:
            conn.close()
        self._clients.clear()
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.terminate()
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def _slug(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:24] or "run"


def _socket_base() -> str:
    """A temp dir short enough for a Unix socket path (108 bytes at most)."""
    base = tempfile.gettempdir()
    return base if len(base) <= 48 else "/tmp"


class _Peer:
    """One client connection inside the services process."""

    __slots__ = ("sock", "fd", "reader", "out", "writing", "slot")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.slot = -1  # its slot in the wait board, once it asked for one
        self.reader = SocketFrameReader()
        self.out: deque[tuple[memoryview, list[int]]] = deque()
        self.writing = False  # also polled for EPOLLOUT: the socket was full


_IN = select.EPOLLIN
_IN_OUT = select.EPOLLIN | select.EPOLLOUT


class _Server:
    """The single-threaded loop: accepts clients, applies requests in arrival order."""

    def __init__(self, listener: socket.socket, parent: int, signalled: int) -> None:
        self._poll = select.epoll()
        self._poll.register(listener.fileno(), _IN)
        self._poll.register(_CONTROL_FD, _IN)
        self._poll.register(signalled, _IN)
        self._signalled = signalled
        self._listener = listener
        self._parent = parent
        fastpaths = fastpaths_on()
        self._store = StoreTable(fastpaths=fastpaths)
        self._board = TopicBoard()
        self._wait_board: board.Board | None = None
        self._wait_board_fd = -1
        if fastpaths and board.available():
            self._wait_board_fd, self._wait_board = board.create()
        self._peers: dict[int, _Peer] = {}
        self._contention = Contention()
        self._served = False  # requests came in this turn: the next one is likely close

    def run(self) -> None:
        """Serve until stdin hits EOF, SIGTERM arrives, or the manager is gone."""
        listener = self._listener.fileno()
        for turn in itertools.count():
            deadline = self._board.next_deadline()
            timeout = _PARENT_CHECK_S
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - time.monotonic()))
            if self._store.has_retired:
                timeout = 0.0  # release replaced values as soon as nothing else is waiting
            ready = self._next_ready(timeout)
            if not ready:
                self._store.release_retired()
            if (not ready or turn % 1024 == 0) and os.getppid() != self._parent:
                return  # re-parented: the manager died (its pipe may live on in workers)
            for fd, mask in ready:
                peer = self._peers.get(fd)
                if peer is not None:
                    self._serve(peer, mask)
                elif fd == listener:
                    self._accept()
                elif fd == self._signalled:
                    return  # SIGTERM
                elif fd == _CONTROL_FD and not os.read(fd, 4096):
                    return  # EOF: the manager closed its end, or died
            if deadline is not None:
                for delivery in self._board.expire(time.monotonic()):
                    self._deliver(*delivery)
                self._ring_ended()

    def _next_ready(self, timeout: float) -> list[tuple[int, int]]:
        """epoll's answer; right after requests, spin first while the CPUs are quiet
        (a client's next request usually comes before a wake-up would)."""
        served, self._served = self._served, False
        if served and self._contention.quiet():
            ready = spin_poll(self._poll.poll, SPIN_S)
            if ready:
                return ready
        return self._poll.poll(timeout)

    def close(self) -> None:
        for peer in list(self._peers.values()):
            self._drop(peer)
        self._store.close()
        self._board.close()
        if self._wait_board_fd >= 0:
            os.close(self._wait_board_fd)
        self._listener.close()
        self._poll.close()

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        peer = _Peer(sock)
        self._peers[peer.fd] = peer
        self._poll.register(peer.fd, _IN)

    def _serve(self, peer: _Peer, mask: int) -> None:
        if mask & select.EPOLLOUT:
            self._flush(peer)
        if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        try:
            alive = peer.reader.fill(peer.sock)
        except BlockingIOError:
            return
        except (OSError, ServiceError):
            alive = False
        if not alive:
            self._drop(peer)
            return
        reader = peer.reader
        self._served = True
        try:
            while (frame := reader.next()) is not None:
                self._handle(peer, *frame)
                if peer.fd not in self._peers:
                    break
        except ServiceError:
            self._drop(peer)  # a client that breaks the protocol loses its connection

    def _handle(self, peer: _Peer, msg: Message, fds: deque[int]) -> None:
        kind = type(msg)
        if kind is Put:
            self._apply_unanswered(peer, msg, fds)
            return
        try:
            if kind in STORE_REQUESTS:
                reply = self._store.apply(msg, fds)
                self._give_spares(peer)
                self._deliver(peer, *reply)
            elif kind in EVENT_REQUESTS:
                for delivery in self._board.apply(peer, msg, fds, time.monotonic()):
                    self._deliver(*delivery)
                self._ring_ended()
            elif kind is AskBoard:
                self._share_wait_board(peer)
            elif kind is Ping:
                self._deliver(peer, Ok(os.getpid()), [])
            else:
                raise ValueError(f"unknown request {msg.tag!r}")
        except (KeyError, TypeError, ValueError) as exc:
            self._deliver(peer, error_reply(exc), [])
        except Exception as exc:  # a bug or a value that cannot load: the client gets it
            self._deliver(peer, Err(type(exc).__name__, str(exc)), [])
        finally:
            if fds:
                close_all(fds)

    def _share_wait_board(self, peer: _Peer) -> None:
        """Give the client a slot in the wait board (executor/services/board.py), if any is left."""
        if self._wait_board is not None and peer.slot < 0:
            peer.slot = self._wait_board.assign()
        if peer.slot < 0:
            self._deliver(peer, Ok(-1), [])
        else:
            self._deliver(peer, Ok(peer.slot), [Blob(b"", self._wait_board_fd)])

    def _ring_if_parked(self, peer: _Peer) -> None:
        """A waiter parked in the wait board sleeps on its bell, not on its socket: ring
        it for anything sent meanwhile (a subscription's payloads), or the socket could
        fill up while it sleeps."""
        if peer.slot >= 0 and self._wait_board is not None and self._board.parked(peer):
            self._wait_board.ring(peer.slot)

    def _ring_ended(self) -> None:
        """Wake the waiters whose parked wait was just answered (they may sleep on their
        slot's bell rather than on the socket)."""
        ended = self._board.ended
        if not ended:
            return
        wait_board = self._wait_board
        for waiter in ended:
            if wait_board is not None and isinstance(waiter, _Peer) and waiter.slot >= 0:
                wait_board.ring(waiter.slot)
        ended.clear()

    def _apply_unanswered(self, peer: _Peer, msg: Message, fds: deque[int]) -> None:
        """A write the client does not wait for: a failure cannot be answered, so the
        client loses its connection and its next call fails instead."""
        try:
            self._store.apply(msg, fds)
            self._give_spares(peer)
        except Exception:
            self._drop(peer)
        finally:
            if fds:
                close_all(fds)

    def _give_spares(self, peer: _Peer) -> None:
        """The memfds of store values the request replaced go back to its sender, who
        writes its next big values into them (executor/services/memfd_values.py)."""
        freed = self._store.freed
        if freed:
            self._deliver(peer, SPARE, freed)
            for blob in freed:
                self._store.release_later(blob)  # the client holds them now, or is gone
            freed.clear()

    def _deliver(self, peer: Hashable, msg: Message, blobs: list[Blob]) -> None:
        if not isinstance(peer, _Peer) or self._peers.get(peer.fd) is not peer:
            return  # dropped meanwhile
        fds = [os.dup(blob.fd) for blob in blobs if blob.fd >= 0] if blobs else []
        data = pack(msg, len(fds))
        if peer.out:
            peer.out.append((memoryview(data), fds))
            return
        try:
            sent = send_now(peer.sock, data, fds)
        except OSError:
            sent = -1
        if sent and fds:
            for fd in fds:
                os.close(fd)  # sent, or the peer is gone
        if sent < 0:
            self._drop(peer)
            return
        if sent < len(data):
            peer.out.append((memoryview(data)[sent:], [] if sent else fds))
            self._want_out(peer, True)
        self._ring_if_parked(peer)

    def _flush(self, peer: _Peer) -> None:
        while peer.out:
            view, fds = peer.out[0]
            try:
                sent = send_now(peer.sock, view, fds)
            except OSError:
                self._drop(peer)
                return
            if sent:
                for fd in fds:
                    os.close(fd)
                fds.clear()
            self._ring_if_parked(peer)
            if sent < len(view):
                peer.out[0] = (view[sent:], fds)
                return
            peer.out.popleft()
        self._want_out(peer, False)

    def _want_out(self, peer: _Peer, on: bool) -> None:
        if peer.writing != on:
            peer.writing = on
            self._poll.modify(peer.fd, _IN_OUT if on else _IN)

    def _drop(self, peer: _Peer) -> None:
        if self._peers.pop(peer.fd, None) is not peer:
            return
        self._board.drop(peer)
        self._poll.unregister(peer.fd)
        peer.sock.close()
        peer.reader.close()
        for _, fds in peer.out:
            for fd in fds:
                os.close(fd)
        peer.out.clear()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Nothing to do here: the signal's wake-up byte ends the loop between requests."""


def main(argv: list[str]) -> int:
    """Serve one run: `python -m executor.services.server LISTENER_FD SOCKET_DIR`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signalled, wakeup = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup)
    signal.signal(signal.SIGTERM, _on_sigterm)
    listener = socket.socket(fileno=int(argv[0]))
    listener.setblocking(False)
    server = _Server(listener, os.getppid(), signalled)
    try:
        server.run()
    finally:
        server.close()
        shutil.rmtree(argv[1], ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
