"""Real `imagefactory builder` processes against real `imagefactory serve` processes on
loopback, on SQLite and on a real PostgreSQL, baking real installer environments
(`imagefactory bake --format installer`: a .deb and install.sh, about a second each).

To catch a builder in the middle of a build, a test freezes its bake (SIGSTOP on the
child process, found in /proc) and lets it go on (SIGCONT) once the fault is set up: the
signals the builder sends meanwhile wait, pending, and are then handled for real.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from imagefactory.cli.bake import FORMATS
from imagefactory.server.blobs import BlobStore
from tests.integration.build_fleet import (
    ADMIN,
    Fleet,
    admin,
    build_state,
    ended,
    publish_pipelines,
    signal_pending,
    submit,
    wait_for,
)
from tests.integration.postgres_cluster import running_postgres
from tests.processes import process_alive

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif("installer" not in FORMATS, reason="needs the installer format"),
]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with running_postgres() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    db = None
    if request.param == "postgresql":
        base: str = request.getfixturevalue("postgres_url")
        name = f"t{time.monotonic_ns()}"
        engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")  # CREATE DATABASE
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
        finally:
            engine.dispose()
        db = base.rsplit("/", 1)[0] + f"/{name}"
    fleet = Fleet(tmp_path, db)
    try:
        yield fleet
    finally:
        fleet.close()


def test_three_builders_race_for_twenty_jobs(fleet: Fleet) -> None:
    """Each build is made exactly once; on PostgreSQL the builders talk to two replicas."""
    first = fleet.server()
    urls = [first.url, fleet.server().url if fleet.db else first.url]
    names = publish_pipelines(first.url, fleet.workdir, 20)
    builds = [submit(urls[i % 2], name) for i, name in enumerate(names)]
    for i in range(3):
        fleet.builder(urls[i % 2], f"b{i}")
    for build in builds:
        done = wait_for(fleet, f"build {build['build_id']}", ended(urls[1], build["build_id"]))
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] == 1
    claims = Counter(
        line.split()[2]
        for b in fleet.builders
        for line in b.log().splitlines()
        if line.startswith("builder: build ") and " attempt " in line
    )
    assert set(claims) == {b["build_id"] for b in builds} and set(claims.values()) == {1}
    envs = admin(urls[0], "GET", "/v1/environments")
    assert sorted(e["build_id"] for e in envs) == sorted(b["build_id"] for b in builds)
    assert len({e["digest"] for e in envs}) == 20
    store = BlobStore(fleet.workdir / "store")
    assert all(store.has(e["digest"]) for e in envs)
    assert len({b.builder_id for b in fleet.builders if "attempt 1" in b.log()}) >= 2, (
        "the work was shared"
    )


def test_sigkilled_builder_job_is_rebuilt_elsewhere(fleet: Fleet) -> None:
    server = fleet.server(lease_s=3.0)
    [name] = publish_pipelines(server.url, fleet.workdir, 1)
    build = submit(server.url, name)
    doomed = fleet.builder(server.url, "doomed")
    bake = doomed.bake_child()
    fleet.freeze(bake)
    doomed.stop(signal.SIGKILL)
    # The orphaned bake got its parent-death signal (the kernel may also wake an orphaned
    # stopped group with SIGHUP and SIGCONT); once it runs, it ends: no stray bake.
    pending = signal_pending(bake, signal.SIGTERM)
    wait_for(fleet, "SIGTERM for the bake", lambda: pending() or not process_alive(bake))
    fleet.thaw(bake)
    wait_for(fleet, "the orphaned bake to end", lambda: not process_alive(bake), 60)
    fleet.builder(server.url, "rescuer")
    done = wait_for(fleet, "the rebuild", ended(server.url, build["build_id"]))
    assert done["state"] == "succeeded" and done["builder_id"] == "rescuer"
    assert done["attempt"] == 2
    [env] = admin(server.url, "GET", "/v1/environments")
    assert env["build_id"] == build["build_id"]


@pytest.mark.parametrize("lease_s, slow_stop_s", [(10.0, 0.0), (2.0, 6.0)])
def test_cancel_interrupts_the_bake(tmp_path: Path, lease_s: float, slow_stop_s: float) -> None:
    """A bake slower to stop than the lease (three leases here) keeps it: the builder
    renews it meanwhile, and the build ends with the builder's own report, not as "the
    builder went silent"."""
    fleet = Fleet(tmp_path)
    try:
        server = fleet.server(lease_s=lease_s)
        [name] = publish_pipelines(server.url, fleet.workdir, 1)
        build = submit(server.url, name)
        builder = fleet.builder(server.url, "b1", grace_s=120)
        bake = builder.bake_child()
        fleet.freeze(bake)
        shown = admin(server.url, "POST", f"/v1/builds/{build['build_id']}/cancel")
        assert shown["state"] == "building" and shown["cancel_requested"]
        # The builder saw the cancel and sent the bake its Ctrl-C: it waits, pending.
        wait_for(fleet, "SIGINT pending on the bake", signal_pending(bake, signal.SIGINT), 60)
        time.sleep(slow_stop_s)
        shown = admin(server.url, "GET", f"/v1/builds/{build['build_id']}")
        assert shown["state"] == "building", shown
        fleet.thaw(bake)
        done = wait_for(fleet, "the cancel", ended(server.url, build["build_id"]), 60)
        assert (done["state"], done["error"], done["attempt"]) == ("cancelled", "cancelled", 1)
        assert not process_alive(bake)
        assert admin(server.url, "GET", "/v1/environments") == []
        assert "cancelled; interrupting the bake" in builder.log()
        assert builder.proc is not None and builder.proc.poll() is None, "builder goes on"
    finally:
        fleet.close()


def test_lost_lease_late_result_is_refused(tmp_path: Path) -> None:
    """A builder cut off (frozen) past its lease: the job runs elsewhere, and what the
    first builder sends afterwards is refused; the environment is stored once."""
    fleet = Fleet(tmp_path)
    try:
        server = fleet.server(lease_s=2.0)
        [name] = publish_pipelines(server.url, fleet.workdir, 1)
        build = submit(server.url, name)
        late = fleet.builder(server.url, "late")
        bake = late.bake_child()
        fleet.freeze(bake)
        assert late.proc is not None
        fleet.freeze(late.proc.pid)
        fleet.builder(server.url, "other")
        done = wait_for(fleet, "the rebuild", ended(server.url, build["build_id"]))
        assert done["state"] == "succeeded" and done["builder_id"] == "other"
        fleet.thaw(late.proc.pid)
        fleet.thaw(bake)
        wait_for(fleet, "the late builder to give up", lambda: "lease lost" in late.log(), 120)
        assert late.proc.poll() is None, "the late builder goes on"
        [env] = admin(server.url, "GET", "/v1/environments")
        assert env["build_id"] == build["build_id"]
        assert build_state(server.url, build["build_id"]) == done
    finally:
        fleet.close()


def test_master_restart_during_build_upload_is_retried(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        server = fleet.server(lease_s=60.0, name="master")
        [name] = publish_pipelines(server.url, fleet.workdir, 1)
        build = submit(server.url, name)
        builder = fleet.builder(server.url, "b1")
        bake = builder.bake_child()
        fleet.freeze(bake)
        server.kill()
        fleet.thaw(bake)  # the bake finishes while the master is down
        wait_for(fleet, "upload retries", lambda: "upload: master unreachable" in builder.log())
        restarted = fleet.server(lease_s=60.0, port=server.port, name="master")
        done = wait_for(fleet, "the build", ended(restarted.url, build["build_id"]))
        assert done["state"] == "succeeded" and done["attempt"] == 1
        assert "upload: master reachable again" in builder.log()
        [env] = admin(restarted.url, "GET", "/v1/environments")
        log = httpx.get(
            f"{restarted.url}/v1/builds/{build['build_id']}/log",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        ).text
        assert "==> package:" in log and "==> script: done in" in log
        pulled = httpx.get(
            f"{restarted.url}/v1/environments/{env['digest']}",
            headers={"Authorization": f"Bearer {ADMIN}"},
            timeout=60,
        )
        assert pulled.content.startswith(b"#!") and len(pulled.content) == env["size"]
    finally:
        fleet.close()
