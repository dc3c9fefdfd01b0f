"""The wait board (executor/services/board.py) in one process: parking, hand-off, token rules."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from executor.services import board
from executor.services.board import Board, ParkedWait
from executor.services.sharedmem import digest
from tests.shared_tables import second_mapping

pytestmark = pytest.mark.skipif(not board.available(), reason="needs glibc semaphores")


@pytest.fixture
def wait_board() -> Iterator[Board]:
    yield from second_mapping(board.create, Board)


def parked(wait_board: Board, topic: str) -> ParkedWait:
    wait = ParkedWait(wait_board, wait_board.assign(), digest(topic))
    wait.park()
    return wait


def test_a_parked_wait_gets_the_payload_of_its_topic_only(wait_board: Board) -> None:
    ready, other = parked(wait_board, "ready"), parked(wait_board, "other")
    wait_board.hand_off(digest("ready"), b"payload")
    assert ready.taken() == b"payload"
    assert other.taken() is None
    wait_board.hand_off(digest("ready"), b"again")  # the first publisher kept the token
    assert ready.taken() is None


def test_only_parked_slots_are_written(wait_board: Board) -> None:
    wait = parked(wait_board, "t")
    wait.unpark()  # the services answered first: the token is back with the waiter
    wait_board.hand_off(digest("t"), b"late")
    assert wait.taken() is None
    wait.park()  # the next wait of the same connection
    wait_board.hand_off(digest("t"), b"next")
    assert wait.taken() == b"next"


def test_a_payload_that_contains_a_digest_is_not_a_slot(wait_board: Board) -> None:
    a, b = parked(wait_board, "a"), parked(wait_board, "b")
    tricky = b"x" + digest("a") * 3
    wait_board.hand_off(digest("b"), tricky)
    assert b.taken() == tricky
    b.park()  # parked again: its old payload (holding a's digest) stays in its slot
    wait_board.hand_off(digest("a"), b"for a")
    assert a.taken() == b"for a"
    assert b.taken() is None


def test_a_publisher_that_never_finishes_kills_the_slot(
    wait_board: Board, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(board, "_PUBLISHER_GRACE_S", 0.05)
    wait = parked(wait_board, "t")
    assert wait_board._wait(wait.slot, board._CLAIM, 0)  # a publisher takes the token, dies
    wait.unpark()
    assert wait.slot in wait_board.dead


def test_the_bell_wakes_a_sleeper_and_park_drops_old_rings(wait_board: Board) -> None:
    wait = parked(wait_board, "t")
    wait_board.ring(wait.slot)  # an answer that came the long way
    wait.sleep()  # returns at once: the bell was rung
    wait_board.ring(wait.slot)
    wait.park()  # a new wait starts without the old ring
    assert not wait_board._wait(wait.slot, board._BELL, 0)


def test_slots_run_out_instead_of_being_reused(wait_board: Board) -> None:
    slots = [wait_board.assign() for _ in range(board.BOARD_SLOTS - 1)]
    assert slots == list(range(1, board.BOARD_SLOTS))
    assert wait_board.assign() == -1


def test_payloads_up_to_the_limit_fit(wait_board: Board) -> None:
    wait = parked(wait_board, "big")
    payload = os.urandom(board.MAX_PAYLOAD)
    wait_board.hand_off(digest("big"), payload)
    assert wait.taken() == payload
