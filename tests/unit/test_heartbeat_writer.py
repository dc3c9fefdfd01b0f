"""The heartbeat group commit: one bad row fails only its own request."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import pytest

from imagefactory.server.config import database_url
from imagefactory.server.heartbeats import HeartbeatWriter
from imagefactory.server.storage import HeartbeatRow, Storage


class RefusingStorage(Storage):
    """A real SQLite store whose commits fail whenever a batch holds node `poison` (as a
    database refuses a row it cannot take)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.batches: list[list[str]] = []

    def record_heartbeats(self, rows: Iterable[HeartbeatRow]) -> None:
        rows = list(rows)
        self.batches.append([r.node_id for r in rows])
        if any(r.node_id == "poison" for r in rows):
            raise ValueError("the database refused a row")
        super().record_heartbeats(rows)


def row(node_id: str) -> HeartbeatRow:
    return HeartbeatRow(
        node_id=node_id,
        run_id="run-1",
        seq=1,
        state="running",
        tasks_done=0,
        tasks_total=1,
        interval_s=10.0,
        sent_at="2026-01-02T03:04:05.123456Z",
        last_seen=0.0,
    )


def test_a_bad_row_fails_alone_and_its_batch_is_committed(tmp_path: Path) -> None:
    storage = RefusingStorage(database_url(str(tmp_path / "services.db")))
    names = ["n1", "n2", "poison", "n3", "n4"]

    async def scenario() -> list[BaseException | None]:
        writer = HeartbeatWriter(storage)
        writer.start()
        try:
            outcomes = await asyncio.gather(
                *(writer.record(row(n)) for n in names), return_exceptions=True
            )
        finally:
            await writer.stop()
        return list(outcomes)

    outcomes = asyncio.run(scenario())
    assert storage.batches[0] == names, "the five rows were one batch"
    assert [type(o).__name__ for o in outcomes] == [
        "NoneType", "NoneType", "ValueError", "NoneType", "NoneType"
    ]  # fmt: skip
    assert sorted(n["node_id"] for n in storage.nodes()) == ["n1", "n2", "n3", "n4"]
    storage.close()


@pytest.mark.parametrize("count", [1, 3])
def test_a_batch_without_bad_rows_is_one_commit(tmp_path: Path, count: int) -> None:
    storage = RefusingStorage(database_url(str(tmp_path / "services.db")))

    async def scenario() -> None:
        writer = HeartbeatWriter(storage)
        writer.start()
        try:
            await asyncio.gather(*(writer.record(row(f"n{i}")) for i in range(count)))
        finally:
            await writer.stop()

    asyncio.run(scenario())
    assert storage.batches == [[f"n{i}" for i in range(count)]]
    storage.close()
