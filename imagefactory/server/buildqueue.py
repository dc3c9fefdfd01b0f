"""The build queue, build logs, builders and environments, in the services' database.

    queued --claim--> building --finish--> succeeded | failed | cancelled
       ^                 |
       +--lease expired--+  attempt + 1 (while attempt < max_attempts; else failed, or
                            cancelled if a cancel was asked)
    queued --cancel--> cancelled          building --cancel--> (builder stops) cancelled

A claim picks the oldest queued build a builder can make, under a lock that no other
claim can share: `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL (replicas claim side
by side), `BEGIN IMMEDIATE` on SQLite (one writer at a time). Every later change by a
builder names its build, its builder id and its attempt, and changes nothing unless all
three still hold: a builder whose lease expired cannot touch the build again.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from imagefactory.server.storage import dialect_insert, metadata, rfc3339

ACTIVE = ("queued", "building")
TERMINAL = ("succeeded", "failed", "cancelled")
BuildState = Literal["queued", "building", "succeeded", "failed", "cancelled"]

builds = sa.Table(
    "builds",
    metadata,
    sa.Column("build_id", sa.String(32), primary_key=True),
    sa.Column("inputs", sa.String(64), nullable=False, doc="sha256 of target, format, pipeline"),
    sa.Column("target", sa.String(32), nullable=False),
    sa.Column("format", sa.String(32), nullable=False),
    sa.Column("pipeline", sa.String(128), nullable=False, doc="The gateway name."),
    sa.Column("pipeline_sha256", sa.String(64), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("builder_id", sa.String(128)),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("lease_expires", sa.Float),
    sa.Column("cancel_requested", sa.Boolean, nullable=False),
    sa.Column("stage", sa.String(64)),
    sa.Column("stages", sa.Text, nullable=False, doc="JSON {stage: seconds}"),
    sa.Column("artifacts", sa.Text, nullable=False, doc="JSON [{name, digest, size}]"),
    sa.Column("pushed", sa.Text, doc="JSON {reference, digest} of a registry push"),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.Index("builds_queue", "state", "created_at"),
    # At most one queued or building build per inputs: submit is idempotent under races.
    sa.Index(
        "builds_one_active",
        "inputs",
        unique=True,
        sqlite_where=sa.text("state IN ('queued', 'building')"),
        postgresql_where=sa.text("state IN ('queued', 'building')"),
    ),
)

build_logs = sa.Table(
    "build_logs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("build_id", sa.String(32), nullable=False, index=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("text", sa.Text, nullable=False),
)

builders = sa.Table(
    "builders",
    metadata,
    sa.Column("builder_id", sa.String(128), primary_key=True),
    sa.Column("targets", sa.Text, nullable=False),
    sa.Column("formats", sa.Text, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)

environments = sa.Table(
    "environments",
    metadata,
    sa.Column("build_id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("digest", sa.String(71), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

uploads = sa.Table(
    "build_uploads",
    metadata,
    sa.Column("build_id", sa.String(32), primary_key=True),
    sa.Column("digest", sa.String(71), primary_key=True),
)


@dataclass(frozen=True)
class Lease:
    """What a builder names in every change to its build."""

    build_id: str
    builder_id: str
    attempt: int


class LeaseLost(Exception):
    """The build is no longer this builder's attempt (expired, cancelled, or finished)."""


def inputs_key(target: str, image_format: str, pipeline_sha256: str) -> str:
    text = json.dumps([target, image_format, pipeline_sha256])
    return hashlib.sha256(text.encode()).hexdigest()


class BuildQueue:
    def __init__(self, engine: Engine, lease_s: float, max_attempts: int) -> None:
        self.engine = engine
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self._postgres = engine.dialect.name == "postgresql"
        metadata.create_all(engine, tables=[builds, build_logs, builders, environments, uploads])

    # -- admin side -------------------------------------------------------------------------

    def submit(
        self, target: str, image_format: str, pipeline: str, pipeline_sha256: str
    ) -> tuple[dict[str, Any], bool]:
        """(the build, True if new): an active or succeeded build of the same inputs is
        returned instead of a new one."""
        key = inputs_key(target, image_format, pipeline_sha256)
        for _ in range(3):
            found = self._same_inputs(key)
            if found is not None:
                return found, False
            build_id = uuid.uuid4().hex
            row = {
                "build_id": build_id,
                "inputs": key,
                "target": target,
                "format": image_format,
                "pipeline": pipeline,
                "pipeline_sha256": pipeline_sha256,
                "state": "queued",
                "attempt": 1,
                "cancel_requested": False,
                "stages": "{}",
                "artifacts": "[]",
                "created_at": time.time(),
            }
            try:
                with self.engine.begin() as conn:
                    conn.execute(builds.insert().values(row))
            except IntegrityError:
                continue  # another request queued the same build just now
            build = self.get(build_id)
            assert build is not None
            return build, True
        raise RuntimeError("submit raced three times")

    def _same_inputs(self, key: str) -> dict[str, Any] | None:
        query = (
            sa.select(builds)
            .where(builds.c.inputs == key, builds.c.state.in_([*ACTIVE, "succeeded"]))
            .order_by(builds.c.created_at.desc())
            .limit(1)
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return None if row is None else self._view(row)

    def get(self, build_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(builds).where(builds.c.build_id == build_id))
                .mappings()
                .one_or_none()
            )
        return None if row is None else self._view(row)

    def listing(self, limit: int, state: str | None = None) -> list[dict[str, Any]]:
        self.expire_leases()
        query = sa.select(builds).order_by(builds.c.created_at.desc()).limit(limit)
        if state is not None:
            query = query.where(builds.c.state == state)
        with self.engine.connect() as conn:
            return [self._view(r) for r in conn.execute(query).mappings().all()]

    def cancel(self, build_id: str) -> dict[str, Any] | None:
        """Queued: cancelled at once. Building: marked; the builder stops the bake."""
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(
                builds.update()
                .where(builds.c.build_id == build_id, builds.c.state == "queued")
                .values(state="cancelled", finished_at=now, error="cancelled while queued")
            )
            conn.execute(
                builds.update()
                .where(builds.c.build_id == build_id, builds.c.state == "building")
                .values(cancel_requested=True)
            )
        return self.get(build_id)

    def log_since(self, build_id: str, after: int) -> list[tuple[int, str]]:
        query = (
            sa.select(build_logs.c.seq, build_logs.c.text)
            .where(build_logs.c.build_id == build_id, build_logs.c.seq > after)
            .order_by(build_logs.c.seq)
        )
        with self.engine.connect() as conn:
            return [(r.seq, r.text) for r in conn.execute(query)]

    def builders(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(builders).order_by(builders.c.builder_id)).all()
        return [
            {
                "builder_id": r.builder_id,
                "targets": json.loads(r.targets),
                "formats": json.loads(r.formats),
                "last_seen": rfc3339(r.last_seen),
            }
            for r in rows
        ]

    # -- builder side -----------------------------------------------------------------------

    def register(self, builder_id: str, targets: Sequence[str], formats: Sequence[str]) -> None:
        values = {
            "builder_id": builder_id,
            "targets": json.dumps(sorted(targets)),
            "formats": json.dumps(sorted(formats)),
            "last_seen": time.time(),
        }
        insert = dialect_insert(self.engine, builders).values(values)
        upsert = insert.on_conflict_do_update(
            index_elements=[builders.c.builder_id],
            set_={k: insert.excluded[k] for k in values if k != "builder_id"},
        )
        with self.engine.begin() as conn:
            conn.execute(upsert)

    def claim(
        self, builder_id: str, targets: Sequence[str], formats: Sequence[str]
    ) -> dict[str, Any] | None:
        """Take the oldest queued build this builder can make, or None."""
        if not targets or not formats:
            return None
        now = time.time()
        pick = (
            sa.select(builds.c.build_id)
            .where(
                builds.c.state == "queued",
                builds.c.target.in_(list(targets)),
                builds.c.format.in_(list(formats)),
            )
            .order_by(builds.c.created_at, builds.c.build_id)
            .limit(1)
        )
        with self.engine.connect() as conn:
            if self._postgres:
                pick = pick.with_for_update(skip_locked=True)
                conn.begin()
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            row = conn.execute(pick).one_or_none()
            if row is None:
                conn.rollback()
                return None
            conn.execute(
                builds.update()
                .where(builds.c.build_id == row.build_id)
                .values(
                    state="building",
                    builder_id=builder_id,
                    lease_expires=now + self.lease_s,
                    started_at=now,
                    stage=None,
                    stages="{}",
                    error=None,
                )
            )
            conn.commit()
        return self.get(row.build_id)

    def renew(
        self, lease: Lease, stage: str | None, stages: dict[str, float], log: Sequence[str]
    ) -> bool:
        """Extend the lease, record progress and log lines; True if a cancel was asked."""
        with self.engine.begin() as conn:
            done = conn.execute(
                builds.update()
                .where(*self._held(lease))
                .values(
                    lease_expires=time.time() + self.lease_s,
                    stage=stage,
                    stages=json.dumps(stages),
                )
                .returning(builds.c.cancel_requested)
            ).one_or_none()
            if done is None:
                raise LeaseLost(lease.build_id)
            if log:
                conn.execute(
                    build_logs.insert(),
                    [
                        {"build_id": lease.build_id, "attempt": lease.attempt, "text": line}
                        for line in log
                    ],  # fmt: skip
                )
        return bool(done.cancel_requested)

    def holds(self, lease: Lease) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(builds.c.build_id).where(*self._held(lease)))
            return found.one_or_none() is not None

    def touch(self, lease: Lease) -> bool:
        """Extend a lease that is still held (uploads count as signs of life)."""
        with self.engine.begin() as conn:
            done = conn.execute(
                builds.update()
                .where(*self._held(lease))
                .values(lease_expires=time.time() + self.lease_s)
            )
            return done.rowcount == 1

    def finish(
        self,
        lease: Lease,
        state: BuildState,
        stages: dict[str, float],
        artifacts: Sequence[dict[str, Any]],
        error: str | None,
        pushed: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """End the build; a success records its artifacts as environments, in one commit."""
        now = time.time()
        if state == "succeeded":
            error = None
        with self.engine.begin() as conn:
            done = conn.execute(
                builds.update()
                .where(*self._held(lease))
                .values(
                    state=state,
                    stage=None,
                    stages=json.dumps(stages),
                    artifacts=json.dumps(list(artifacts)),
                    pushed=None if pushed is None else json.dumps(pushed),
                    error=error,
                    finished_at=now,
                    lease_expires=None,
                )
            )
            if done.rowcount != 1:
                raise LeaseLost(lease.build_id)
            if state == "succeeded" and artifacts:
                rows = [
                    {
                        "build_id": lease.build_id,
                        "name": a["name"],
                        "digest": a["digest"],
                        "size": a["size"],
                        "created_at": now,
                    }
                    for a in artifacts
                ]
                conn.execute(environments.insert(), rows)
        build = self.get(lease.build_id)
        assert build is not None
        return build

    def expire_leases(self) -> None:
        """Builds whose builder went silent: back to the queue, or ended for good."""
        now = time.time()
        expired = sa.and_(builds.c.state == "building", builds.c.lease_expires < now)
        ends = {"finished_at": now, "lease_expires": None, "stage": None}
        with self.engine.begin() as conn:
            conn.execute(
                builds.update()
                .where(expired, builds.c.cancel_requested)
                .values(state="cancelled", error="cancelled; the builder went silent", **ends)
            )
            conn.execute(
                builds.update()
                .where(expired, builds.c.attempt >= self.max_attempts)
                .values(
                    state="failed",
                    error=f"the lease expired in all {self.max_attempts} attempts",
                    **ends,
                )
            )
            conn.execute(
                builds.update()
                .where(expired)
                .values(
                    state="queued",
                    attempt=builds.c.attempt + 1,
                    builder_id=None,
                    lease_expires=None,
                    stage=None,
                )
            )

    # -- environments -----------------------------------------------------------------------

    def environments(self) -> list[dict[str, Any]]:
        query = (
            sa.select(environments, builds.c.target, builds.c.format, builds.c.pipeline,
                      builds.c.pipeline_sha256)
            .join(builds, builds.c.build_id == environments.c.build_id)
            .order_by(environments.c.created_at.desc(), environments.c.name)
        )  # fmt: skip
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**r, "created_at": rfc3339(r["created_at"])} for r in rows]

    def environment(self, digest: str) -> dict[str, Any] | None:
        query = sa.select(environments).where(environments.c.digest == digest).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return None if row is None else dict(row)

    def uploaded(self, lease: Lease, digest: str) -> None:
        """Note a finished upload, so that pruning keeps it while the build goes on."""
        insert = dialect_insert(self.engine, uploads).values(build_id=lease.build_id, digest=digest)
        with self.engine.begin() as conn:
            conn.execute(insert.on_conflict_do_nothing())

    def referenced(self) -> set[str]:
        """Digests something still needs: environments, and the pipelines and uploads of
        builds that have not ended."""
        active = builds.c.state.in_(ACTIVE)
        with self.engine.connect() as conn:
            envs = conn.execute(sa.select(environments.c.digest)).scalars().all()
            pipes = conn.execute(sa.select(builds.c.pipeline_sha256).where(active)).scalars()
            sent = conn.execute(
                sa.select(uploads.c.digest)
                .join(builds, builds.c.build_id == uploads.c.build_id)
                .where(active)
            ).scalars()
            return {*envs, *(f"sha256:{p}" for p in pipes), *sent}

    def active_build_ids(self) -> set[str]:
        with self.engine.connect() as conn:
            ids = conn.execute(sa.select(builds.c.build_id).where(builds.c.state.in_(ACTIVE)))
            return set(ids.scalars().all())

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _held(lease: Lease) -> list[sa.ColumnElement[bool]]:
        return [
            builds.c.build_id == lease.build_id,
            builds.c.state == "building",
            builds.c.builder_id == lease.builder_id,
            builds.c.attempt == lease.attempt,
        ]

    @staticmethod
    def _view(row: Any) -> dict[str, Any]:
        """A build as the API shows it."""
        return {
            "build_id": row["build_id"],
            "target": row["target"],
            "format": row["format"],
            "pipeline": row["pipeline"],
            "pipeline_sha256": row["pipeline_sha256"],
            "state": row["state"],
            "builder_id": row["builder_id"],
            "attempt": row["attempt"],
            "cancel_requested": bool(row["cancel_requested"]),
            "stage": row["stage"],
            "stages": json.loads(row["stages"]),
            "artifacts": json.loads(row["artifacts"]),
            "pushed": None if row["pushed"] is None else json.loads(row["pushed"]),
            "error": row["error"],
            "created_at": rfc3339(row["created_at"]),
            "started_at": None if row["started_at"] is None else rfc3339(row["started_at"]),
            "finished_at": None if row["finished_at"] is None else rfc3339(row["finished_at"]),
        }
