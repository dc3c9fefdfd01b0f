"""Group commit for heartbeats.

Every heartbeat must be committed before its 204, but one transaction per heartbeat would
cap a fleet at the disk's fsync rate. Requests queue their row and wait; one writer task
takes everything queued (up to MAX_BATCH rows), commits it in one transaction, and wakes
them all. If that commit fails, the rows are committed one by one, so one bad row fails
only its own request.

    request ─► queue ─► writer task ─► Storage.record_heartbeats ─► futures done

Where the commit runs depends on the database:

- SQLite: on the event loop itself. The writer calls `record_heartbeats` directly, so the
  loop serves nothing else until the commit returns: a local WAL commit at
  `synchronous=NORMAL` (no fsync, except when an automatic WAL checkpoint falls due),
  plus any wait for SQLite's write lock while a report or pipeline commit holds it
  (SQLite's busy_timeout, 30 s at most). Requests that arrive meanwhile wait, unread,
  until the loop is free; their rows form the next batch. This is cheaper than handing
  the commit to a thread and back (docs/performance.md).
- PostgreSQL: in a worker thread (`asyncio.to_thread`). The loop keeps serving requests
  while the commit crosses the network, their rows queue up, and the writer takes them
  as the next batch once the commit has returned: one heartbeat commit at a time.
"""

from __future__ import annotations

import asyncio
import contextlib

from imagefactory.server.storage import HeartbeatRow, Storage

MAX_BATCH = 2000


class HeartbeatWriter:
    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._queue: asyncio.Queue[tuple[HeartbeatRow, asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        # SQLite commits on the loop, PostgreSQL from a thread (see the module docstring).
        self._inline = storage.engine.dialect.name == "sqlite"

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def record(self, row: HeartbeatRow) -> None:
        """Returns once the heartbeat is committed; raises if the commit failed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((row, future))
        await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit([r for r, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                    continue
                # One bad row must not fail the others: commit them one by one.
                for row, future in batch:
                    try:
                        await self._commit([row])
                    except Exception as row_exc:
                        _settle(future, row_exc)
                    else:
                        _settle(future, None)
            else:
                for _, future in batch:
                    _settle(future, None)

    async def _commit(self, rows: list[HeartbeatRow]) -> None:
        if self._inline:
            self._storage.record_heartbeats(rows)
        else:
            await asyncio.to_thread(self._storage.record_heartbeats, rows)


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    """Wake one waiting request (unless it gave up): with its row committed, or the error."""
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
