"""Which replies a services connection still has to read (`ReplyLedger`).

Each connection's requests are answered in order, one final reply each (a wait that
parks first gets `Pending`). A call that ends without reading its final reply, because
it was interrupted or because a publisher handed its wait a payload through the wait
board (board.py), leaves that reply owed: the connection reads and drops owed replies
before its next request, or when they arrive between calls. After a hand-off the wait
may still be parked in the services, so the next call first sends an `Unwait`, which
makes the services answer it at once.
"""

from __future__ import annotations

from enum import Enum
from typing import NoReturn

from executor.services.protocol import Message, Pending


class CallState(Enum):
    IDLE = "idle"
    SENT = "sent"
    PARKED = "parked"
    ANSWERED = "answered"
    HANDED_OFF = "handed off"


_IDLE, _SENT, _PARKED, _ANSWERED, _HANDED_OFF = CallState


class ReplyLedger:
    """The bookkeeping of one connection's calls (used under its call lock).

        IDLE ──sent()──► SENT ──answered()───────────────► ANSWERED ──end()──► IDLE
                          │                                   ▲        True: owed - 1
                          │ parked(): "pending"               │
                          ▼                                   │
                        PARKED ──answered()───────────────────┘
                          │
                          │ handed_off(): the board's payload came first
                          ▼
                       HANDED_OFF ──end()──► IDLE   False: owed as is, unwait_due

        an exception in SENT, PARKED or HANDED_OFF: abandoned() is True (the caller
        sends an Unwait now), then end() ──► IDLE   False: owed as is

    `owed` counts the final replies still to read: sent() adds one, end() of an
    answered call and skipped() of a final reply (not "pending") take one off.
    """

    __slots__ = ("owed", "unwait_due", "state")

    def __init__(self) -> None:
        self.owed = 0
        self.unwait_due = False
        """A wait ended by a hand-off may still be parked in the services."""
        self.state = _IDLE

    def unwait_first(self) -> bool:
        """Whether an Unwait must go before the next request (asked once per hand-off)."""
        due, self.unwait_due = self.unwait_due, False
        return due

    def sent(self) -> None:
        """A call's request went out: its final reply is owed."""
        if self.state is not _IDLE:
            self._refuse(_SENT)
        self.state = _SENT
        self.owed += 1

    def parked(self) -> None:
        """The call's first reply was "pending": the final one comes later."""
        if self.state is not _SENT:
            self._refuse(_PARKED)
        self.state = _PARKED

    def answered(self) -> None:
        """The call read its final reply."""
        if self.state is not _SENT and self.state is not _PARKED:
            self._refuse(_ANSWERED)
        self.state = _ANSWERED

    def handed_off(self) -> None:
        """A publisher's payload ended the parked wait: its final reply stays owed."""
        if self.state is not _PARKED:
            self._refuse(_HANDED_OFF)
        self.state = _HANDED_OFF
        self.unwait_due = True

    def abandoned(self) -> bool:
        """Whether a call that is failing still lacks its final reply."""
        return self.state in (_SENT, _PARKED, _HANDED_OFF)

    def end(self) -> bool:
        """The call is over; whether it read its final reply (which settles every
        request sent before it: the services apply a connection's requests in order)."""
        answered = self.state is _ANSWERED
        if answered:
            self.owed -= 1
        self.state = _IDLE
        return answered

    def skipped(self, reply: Message) -> None:
        """A reply owed to an earlier call was read and dropped."""
        if type(reply) is not Pending:
            self.owed -= 1

    def _refuse(self, target: CallState) -> NoReturn:
        raise RuntimeError(f"reply bookkeeping: {target.value} after {self.state.value}")
