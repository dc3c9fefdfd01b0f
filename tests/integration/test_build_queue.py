"""The build queue on SQLite (BEGIN IMMEDIATE) and on a real PostgreSQL (FOR UPDATE SKIP
LOCKED): claimers on separate engines, as separate servers would be, race for the queue."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from imagefactory.server.buildqueue import BuildQueue, Lease, LeaseLost
from imagefactory.server.config import database_url
from imagefactory.server.storage import create_db_engine
from tests.integration.postgres_cluster import running_postgres

CLAIMERS = 3
JOBS = 20


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return database_url(str(tmp_path / "services.db"))
    url: str = request.getfixturevalue("postgres_url")
    engine = create_db_engine(url)
    BuildQueue(engine, 60, 3)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE builds, build_logs, builders, environments, build_uploads")
    engine.dispose()
    return url


def test_racing_claimers_take_each_build_once(db_url: str) -> None:
    queues = [BuildQueue(create_db_engine(db_url), 60, 3) for _ in range(CLAIMERS)]
    submitted = {queues[0].submit("x86_64-linux", "qcow2", f"p{i}", f"{i:064x}")[0]["build_id"]
                 for i in range(JOBS)}  # fmt: skip
    claimed: list[tuple[int, str]] = []
    start = threading.Barrier(CLAIMERS)

    def claimer(index: int) -> None:
        start.wait()
        while (build := queues[index].claim(f"b{index}", ["x86_64-linux"], ["qcow2"])) is not None:
            claimed.append((index, build["build_id"]))

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    counts = Counter(build_id for _, build_id in claimed)
    assert set(counts) == submitted and set(counts.values()) == {1}
    states = {b["state"] for b in queues[0].listing(100)}
    assert states == {"building"}
    for queue in queues:
        queue.engine.dispose()


def test_lease_expiry_requeues_with_the_attempt_raised(db_url: str) -> None:
    queue = BuildQueue(create_db_engine(db_url), 0.5, 2)
    try:
        build, created = queue.submit("x86_64-linux", "raw", "p", "a" * 64)
        assert created and queue.submit("x86_64-linux", "raw", "p", "a" * 64)[1] is False
        first = queue.claim("b1", ["x86_64-linux"], ["raw"])
        assert first is not None and first["attempt"] == 1
        lease = Lease(build["build_id"], "b1", 1)
        assert queue.renew(lease, "bake", {"base": 1.0}, ["line"]) is False
        time.sleep(0.7)
        queue.expire_leases()
        requeued = queue.get(build["build_id"])
        assert requeued is not None and (requeued["state"], requeued["attempt"]) == ("queued", 2)
        with pytest.raises(LeaseLost):
            queue.renew(lease, None, {}, [])
        second = queue.claim("b2", ["x86_64-linux"], ["raw"])
        assert second is not None and second["attempt"] == 2 and second["builder_id"] == "b2"
        with pytest.raises(LeaseLost):
            queue.finish(lease, "succeeded", {}, [], None)
        time.sleep(0.7)
        queue.expire_leases()
        ended = queue.get(build["build_id"])
        assert ended is not None and ended["state"] == "failed"
        assert queue.log_since(build["build_id"], 0)[0][1] == "line"
        with queue.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM environments")).scalar() == 0
    finally:
        queue.engine.dispose()
