"""The wait board: a publisher hands a payload straight to the waits parked on its topic.

Through the services process an event costs two wake-ups, publisher -> services ->
waiter, each slow on a virtual machine. The board is a shared-memory table with one
slot per connection, made by the services process: a `wait` that had to park (the
services answered "pending") writes its topic's digest into its slot and puts a token in
the slot's ``claim`` semaphore; a task's `publish` looks for slots parked on its topic,
takes the token (so only one publisher writes a slot), writes the payload, posts the
slot's ``done`` semaphore and then its ``bell``: one wake-up (a futex) to the waiter.
Then it sends the publish to the services process as before.

The services process stays the authority: it latches the payload and answers every
parked wait as always, and rings the bell of a connection after answering its wait, so a
waiter sleeping on its bell also learns of answers that came the long way (a publisher
that did not see the slot, a timeout). A waiter that wakes takes the hand-off if there is
one; its connection later skips the services' answer to that wait, like the answer to an
interrupted call. A waiter that got the services' answer first takes its token back; if
a publisher holds it, the waiter waits (a bounded time) for that publisher's bell before
the slot is used again.

Only inline payloads of up to MAX_PAYLOAD bytes are handed off, and only by a publisher
whose earlier store writes were applied (the waiter may read them when it wakes). Slots
are never reused within a run; connections beyond the board's size use the long way,
as every connection does with EXECUTOR_FASTPATHS=off (the services make no board).
Everything here is best effort: whatever fails falls back to the services' answer.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time

from executor.services.sharedmem import DIGEST_SIZE, load_libc, map_memfd

BOARD_SLOTS = 256
"""Slot 0 is the header: how many slots are assigned, and, at slot * DIGEST_SIZE, the topic
digest each parked wait waits for (an index a publisher searches in one call). Each
connection that asks gets one of the other slots, for the rest of the run."""
_SLOT_SIZE = 4096
_SEM_SIZE = 32  # sizeof(sem_t) on 64-bit glibc (x86_64 and aarch64)
_BELL, _CLAIM, _DONE = 0, _SEM_SIZE, 2 * _SEM_SIZE  # semaphores: wake, token, payload
_LEN = 3 * _SEM_SIZE  # u32: the payload's length
_PAYLOAD = _LEN + 4
MAX_PAYLOAD = _SLOT_SIZE - _PAYLOAD
"""The largest inline payload handed off; bigger ones always go the long way."""
_LENGTH = struct.Struct("<I")
_COUNT = struct.Struct("<I")  # at offset 0: slots assigned so far, the header included
_EMPTY_DIGEST = bytes(DIGEST_SIZE)
_BELL_CHECK_S = 1.0  # a sleeping waiter looks at its connection at least this often
_PUBLISHER_GRACE_S = 1.0  # how long a waiter waits for a publisher that took its token


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_POINTER = ctypes.c_void_p
_libc = load_libc(
    {
        "sem_init": [_POINTER, ctypes.c_int, ctypes.c_uint],
        "sem_post": [_POINTER],
        "sem_trywait": [_POINTER],
        # glibc 2.30+: waits on CLOCK_MONOTONIC. Without it every event goes the long way.
        "sem_clockwait": [_POINTER, ctypes.c_int, ctypes.POINTER(_Timespec)],
    }
)


def available() -> bool:
    return _libc is not None


def create() -> tuple[int, Board]:
    """A new board (its memfd, to share) with every semaphore at zero (the services)."""
    fd = os.memfd_create("executor-wait-board", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, BOARD_SLOTS * _SLOT_SIZE)
        board = Board(fd)
        for slot in range(1, BOARD_SLOTS):
            board.reset(slot)
    except BaseException:
        os.close(fd)
        raise
    _COUNT.pack_into(board._map, 0, 1)
    return fd, board


class Board:
    """One process's view of the run's board (mapped from the services' memfd)."""

    def __init__(self, fd: int) -> None:
        if _libc is None:
            raise OSError("no C library semaphores here")
        self._map, self._base = map_memfd(fd, BOARD_SLOTS * _SLOT_SIZE)
        self._libc = _libc
        self.dead: set[int] = set()
        """Slots this process must not park in again (a publisher never finished)."""

    def _sem(self, slot: int, which: int) -> int:
        """The address of one of ``slot``'s semaphores."""
        return self._base + slot * _SLOT_SIZE + which

    def reset(self, slot: int) -> None:
        """Every semaphore at zero and no topic (the services, at creation)."""
        self._set_digest(slot, _EMPTY_DIGEST)
        for which in (_BELL, _CLAIM, _DONE):
            if self._libc.sem_init(self._sem(slot, which), 1, 0) != 0:
                raise OSError(ctypes.get_errno(), "sem_init failed")

    # --- the services process ------------------------------------------------------

    def assign(self) -> int:
        """A slot for a new connection, or -1 when all are taken."""
        count: int = _COUNT.unpack_from(self._map, 0)[0]
        if count >= BOARD_SLOTS:
            return -1
        _COUNT.pack_into(self._map, 0, count + 1)
        return count

    def ring(self, slot: int) -> None:
        """Wake the waiter of ``slot``: the services answered its wait."""
        self._libc.sem_post(self._sem(slot, _BELL))

    # --- a publisher -----------------------------------------------------------------

    def hand_off(self, topic_digest: bytes, payload: bytes) -> None:
        """Give ``payload`` to every wait parked on the topic."""
        board, libc = self._map, self._libc
        end = _COUNT.unpack_from(board, 0)[0] * DIGEST_SIZE
        at = board.find(topic_digest, DIGEST_SIZE, end)
        while at >= 0:
            slot, offset = divmod(at, DIGEST_SIZE)
            at = board.find(topic_digest, at + 1, end)
            if offset or libc.sem_trywait(self._sem(slot, _CLAIM)) != 0:
                continue  # not a whole entry; or not parked, or another publisher was first
            if self._digest(slot) != topic_digest:
                libc.sem_post(self._sem(slot, _CLAIM))  # parked on another topic since
                continue
            start = slot * _SLOT_SIZE
            board[start + _LEN : start + _PAYLOAD + len(payload)] = (
                _LENGTH.pack(len(payload)) + payload
            )
            libc.sem_post(self._sem(slot, _DONE))
            libc.sem_post(self._sem(slot, _BELL))
            # Linux tends to wake the waiter on this CPU: let it run now rather than after
            # this publisher's own round trip to the services (measured: 140 -> 80 us).
            os.sched_yield()

    # --- a waiter ----------------------------------------------------------------------

    def park(self, slot: int, topic_digest: bytes) -> None:
        """Show publishers that this slot waits for the topic."""
        while self._libc.sem_trywait(self._sem(slot, _BELL)) == 0:
            pass  # bells of answers that came the long way earlier
        self._set_digest(slot, topic_digest)
        self._libc.sem_post(self._sem(slot, _CLAIM))

    def sleep(self, slot: int) -> None:
        """Sleep until the bell rings or _BELL_CHECK_S pass (returns either way)."""
        self._wait(slot, _BELL, _BELL_CHECK_S)

    def taken(self, slot: int) -> bytes | None:
        """The payload a publisher handed off to ``slot``, if one did (the slot is then
        free again: the publisher kept the token)."""
        if self._libc.sem_trywait(self._sem(slot, _DONE)) != 0:
            return None
        start = slot * _SLOT_SIZE
        (size,) = _LENGTH.unpack_from(self._map, start + _LEN)
        return self._map[start + _PAYLOAD : start + _PAYLOAD + size]

    def unpark(self, slot: int) -> None:
        """Take the token back after the services answered. When a publisher has it and
        does not finish in time, the slot is dead: never parked in again."""
        self._set_digest(slot, _EMPTY_DIGEST)
        if self._libc.sem_trywait(self._sem(slot, _CLAIM)) == 0:
            return
        done = False
        try:
            done = self._wait(slot, _DONE, _PUBLISHER_GRACE_S)  # a publisher is writing
        finally:
            if not done:  # also when interrupted here: its state is unknown
                self.dead.add(slot)

    def _digest(self, slot: int) -> bytes:
        return self._map[slot * DIGEST_SIZE : (slot + 1) * DIGEST_SIZE]

    def _set_digest(self, slot: int, topic_digest: bytes) -> None:
        self._map[slot * DIGEST_SIZE : (slot + 1) * DIGEST_SIZE] = topic_digest

    def _wait(self, slot: int, which: int, seconds: float) -> bool:
        """Take one count of a semaphore, waiting up to ``seconds``; whether it did."""
        sem = self._sem(slot, which)
        deadline = time.clock_gettime(time.CLOCK_MONOTONIC) + seconds
        when = _Timespec(int(deadline), int(deadline % 1 * 1e9))
        return bool(self._libc.sem_clockwait(sem, time.CLOCK_MONOTONIC, when) == 0)


class ParkedWait:
    """One wait's use of its connection's slot (see `Board`)."""

    __slots__ = ("board", "slot", "topic_digest")

    def __init__(self, board: Board, slot: int, topic_digest: bytes) -> None:
        self.board, self.slot, self.topic_digest = board, slot, topic_digest

    def park(self) -> None:
        self.board.park(self.slot, self.topic_digest)

    def sleep(self) -> None:
        self.board.sleep(self.slot)

    def taken(self) -> bytes | None:
        return self.board.taken(self.slot)

    def unpark(self) -> None:
        self.board.unpark(self.slot)
