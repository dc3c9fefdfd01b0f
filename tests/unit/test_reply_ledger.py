"""ReplyLedger (executor/services/replies.py): which replies a connection still has to read."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from executor.services.protocol import DONE, PENDING, TIMEOUT, Err, Ok
from executor.services.replies import CallState, ReplyLedger


def call(ledger: ReplyLedger, *steps: Callable[[ReplyLedger], None]) -> bool:
    """One call that reaches its end: sent, then ``steps``; what end() says."""
    ledger.sent()
    for step in steps:
        step(ledger)
    return ledger.end()


def test_a_call_answered_at_once_owes_nothing_and_settles() -> None:
    ledger = ReplyLedger()
    ledger.sent()
    assert ledger.owed == 1 and ledger.state is CallState.SENT
    ledger.answered()
    assert not ledger.abandoned()
    assert ledger.end() is True
    assert (ledger.owed, ledger.unwait_due, ledger.state) == (0, False, CallState.IDLE)


def test_a_parked_wait_answered_by_the_services_owes_nothing() -> None:
    ledger = ReplyLedger()
    assert call(ledger, ReplyLedger.parked, ReplyLedger.answered) is True
    assert (ledger.owed, ledger.unwait_due) == (0, False)


def test_a_hand_off_leaves_the_final_reply_owed_and_an_unwait_due_once() -> None:
    ledger = ReplyLedger()
    assert call(ledger, ReplyLedger.parked, ReplyLedger.handed_off) is False, "not settled"
    assert (ledger.owed, ledger.unwait_due, ledger.state) == (1, True, CallState.IDLE)
    assert ledger.unwait_first() is True
    assert ledger.unwait_first() is False, "one unwait per hand-off"
    ledger.skipped(PENDING)  # a "pending" is never the final reply
    assert ledger.owed == 1
    ledger.skipped(TIMEOUT)  # the services' answer to the unwait
    assert ledger.owed == 0


@pytest.mark.parametrize(
    "steps",
    [(), (ReplyLedger.parked,), (ReplyLedger.parked, ReplyLedger.handed_off)],
    ids=["sent", "parked", "handed off"],
)
def test_a_call_interrupted_before_its_final_reply_abandons_it(
    steps: tuple[Callable[[ReplyLedger], None], ...],
) -> None:
    ledger = ReplyLedger()
    ledger.sent()
    for step in steps:
        step(ledger)
    assert ledger.abandoned() is True, "the caller must send an unwait"
    assert ledger.end() is False
    assert ledger.owed == 1 and ledger.state is CallState.IDLE
    assert ledger.unwait_due is (len(steps) == 2), "due only after a hand-off"


def test_a_call_interrupted_after_its_final_reply_is_not_abandoned() -> None:
    ledger = ReplyLedger()
    ledger.sent()
    ledger.answered()  # e.g. on_unblock raised after the reply came
    assert ledger.abandoned() is False
    assert ledger.end() is True and ledger.owed == 0


def test_owed_replies_add_up_and_only_final_ones_are_taken_off() -> None:
    ledger = ReplyLedger()
    for _ in range(3):
        ledger.sent()
        ledger.end()  # interrupted before anything came
    assert ledger.owed == 3
    for reply in (PENDING, DONE, Err("KeyError", "k"), PENDING, Ok(1)):
        ledger.skipped(reply)
    assert ledger.owed == 0
    assert call(ledger, ReplyLedger.answered) is True and ledger.owed == 0


@pytest.mark.parametrize(
    ("before", "wrong"),
    [
        ((), ReplyLedger.answered),
        ((), ReplyLedger.parked),
        ((), ReplyLedger.handed_off),
        ((ReplyLedger.sent,), ReplyLedger.sent),
        ((ReplyLedger.sent,), ReplyLedger.handed_off),
        ((ReplyLedger.sent, ReplyLedger.parked), ReplyLedger.parked),
        ((ReplyLedger.sent, ReplyLedger.answered), ReplyLedger.answered),
        ((ReplyLedger.sent, ReplyLedger.answered), ReplyLedger.handed_off),
        ((ReplyLedger.sent, ReplyLedger.parked, ReplyLedger.handed_off), ReplyLedger.answered),
    ],
)
def test_impossible_transitions_are_refused(
    before: tuple[Callable[[ReplyLedger], None], ...], wrong: Callable[[ReplyLedger], None]
) -> None:
    ledger = ReplyLedger()
    for step in before:
        step(ledger)
    state, owed = ledger.state, ledger.owed
    with pytest.raises(RuntimeError, match="reply bookkeeping"):
        wrong(ledger)
    assert (ledger.state, ledger.owed) == (state, owed)
