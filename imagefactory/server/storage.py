"""Persistent state of the core services, on SQLAlchemy Core.

SQLite (one file, WAL) is the default; any URL SQLAlchemy knows works, and
the statements are written so that several server replicas can share one PostgreSQL: every
write is a single upsert or insert, and idempotency is decided by the primary key, not by a
read followed by a write.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

metadata = sa.MetaData()

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("node_id", sa.String(128), primary_key=True),
    sa.Column("run_id", sa.String(128), nullable=False),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("tasks_done", sa.Integer, nullable=False),
    sa.Column("tasks_total", sa.Integer, nullable=False),
    sa.Column("interval_s", sa.Float, nullable=False),
    sa.Column("sent_at", sa.String(32), nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False, doc="Server clock, seconds since epoch."),
)

reports = sa.Table(
    "reports",
    metadata,
    sa.Column("run_id", sa.String(128), primary_key=True),
    sa.Column("node_id", sa.String(128), nullable=False, index=True),
    sa.Column("pipeline", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", sa.String(32), nullable=False),
    sa.Column("finished_at", sa.String(32), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False, index=True),
    sa.Column("results", sa.Text, nullable=False, doc="The report minus log, as sent."),
    sa.Column("log", sa.Text, nullable=False),
)

pipelines = sa.Table(
    "pipelines",
    metadata,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("published_at", sa.Float, nullable=False),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("spec", sa.Text, nullable=False, doc="JSON: arch, kinds and how to reach it."),
    sa.Column("deployment", sa.Text, doc="JSON: what deploy put on the device, or NULL."),
    sa.Column("version", sa.Integer, nullable=False, doc="1 when created, +1 per replace."),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("deployed_at", sa.Float),
)

StoreOutcome = Literal["created", "unchanged", "conflict"]


@dataclass(frozen=True)
class HeartbeatRow:
    node_id: str
    run_id: str
    seq: int
    state: str
    tasks_done: int
    tasks_total: int
    interval_s: float
    sent_at: str
    last_seen: float


def canonical_json(value: Any) -> str:
    """One text per JSON value: key order and whitespace do not matter."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # each write picks its level: _durability()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    engine = sa.create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        _private_file(engine.url.database)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def dialect_insert(engine: Engine, table: sa.Table) -> Any:
    """An INSERT with the dialect's upsert clauses (on_conflict_do_update/nothing)."""
    dialect = engine.dialect.name
    if dialect == "sqlite":
        return sqlite.insert(table)
    if dialect == "postgresql":
        return postgresql.insert(table)
    raise ValueError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")


def _private_file(database: str | None) -> None:
    """Create a SQLite database file 0600 before SQLite does (it would follow the umask):
    it holds every node's reports. SQLite gives its -wal and -shm files the same mode."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    fd = os.open(database, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class Storage:
    """All reads and writes of the server. Methods are synchronous: app.py calls them from
    a thread, except heartbeat commits on SQLite, which run on the loop (heartbeats.py)."""

    def __init__(self, url: str) -> None:
        self.engine = create_db_engine(url)
        metadata.create_all(self.engine)
        insert = self._insert(nodes)
        self._heartbeat_upsert = insert.on_conflict_do_update(
            index_elements=[nodes.c.node_id],
            set_={c.name: insert.excluded[c.name] for c in nodes.c if c.name != "node_id"},
            where=sa.or_(
                nodes.c.run_id != insert.excluded.run_id,
                nodes.c.seq <= insert.excluded.seq,
                # A restarted agent counts from 1 again, but its beats are newer.
                nodes.c.sent_at < insert.excluded.sent_at,
            ),
        )

    def close(self) -> None:
        self.engine.dispose()

    # -- heartbeats -------------------------------------------------------------------------

    def record_heartbeats(self, rows: Iterable[HeartbeatRow]) -> None:
        """Upsert the latest heartbeat per node, in one transaction (a group commit).

        A heartbeat of the same run with a lower seq and an older sent_at (a late retry) does
        not move a node back.
        """
        latest: dict[str, HeartbeatRow] = {}
        for row in rows:
            latest[row.node_id] = row
        if not latest:
            return
        # One statement executed many times: its compiled form is cached, whatever the batch.
        with self.engine.begin() as conn:
            self._durability(conn, "NORMAL")
            conn.execute(self._heartbeat_upsert, [vars(row) for row in latest.values()])

    def _durability(self, conn: sa.Connection, level: str) -> None:
        """SQLite: FULL fsyncs every commit (reports, pipelines: safe across a power cut).
        NORMAL (heartbeats) is safe across a server crash; a power cut may lose the last
        heartbeats, which the next beat replaces anyway. Others: the server's setting."""
        if self.engine.dialect.name == "sqlite":
            conn.exec_driver_sql(f"PRAGMA synchronous={level}")

    def _insert(self, table: sa.Table) -> Any:
        return dialect_insert(self.engine, table)

    def nodes(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(nodes).order_by(nodes.c.node_id)).mappings().all()
        return [
            {
                "node_id": r["node_id"],
                "run_id": r["run_id"],
                "state": r["state"],
                "last_seen": rfc3339(r["last_seen"]),
                "alive": now - r["last_seen"] < 3 * r["interval_s"],
                "tasks_done": r["tasks_done"],
                "tasks_total": r["tasks_total"],
            }
            for r in rows
        ]

    # -- reports ----------------------------------------------------------------------------

    def put_report(self, report: Mapping[str, Any]) -> StoreOutcome:
        """Store a report once. A repeat equal as a JSON value is "unchanged", else "conflict"."""
        results = {k: v for k, v in report.items() if k != "log"}
        row = {
            "run_id": report["run_id"],
            "node_id": report["node_id"],
            "pipeline": report["pipeline"],
            "status": report["status"],
            "started_at": report["started_at"],
            "finished_at": report["finished_at"],
            "received_at": time.time(),
            "results": json.dumps(results, separators=(",", ":"), ensure_ascii=False),
            "log": report["log"],
        }
        try:
            with self.engine.begin() as conn:
                self._durability(conn, "FULL")
                conn.execute(reports.insert().values(row))
            return "created"
        except IntegrityError:
            pass
        with self.engine.connect() as conn:
            stored = conn.execute(
                sa.select(reports.c.results, reports.c.log).where(reports.c.run_id == row["run_id"])
            ).one()
        same = stored.log == row["log"] and canonical_json(
            json.loads(stored.results)
        ) == canonical_json(results)
        return "unchanged" if same else "conflict"

    def get_report(self, run_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            stored = conn.execute(
                sa.select(reports.c.results, reports.c.log).where(reports.c.run_id == run_id)
            ).one_or_none()
        if stored is None:
            return None
        report: dict[str, Any] = json.loads(stored.results)
        report["log"] = stored.log
        return report

    def runs(self, limit: int, node_id: str | None = None) -> list[dict[str, Any]]:
        cols = [c for c in reports.c if c.name not in ("results", "log")]
        query = sa.select(*cols).order_by(reports.c.received_at.desc()).limit(limit)
        if node_id is not None:
            query = query.where(reports.c.node_id == node_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
        return [{**r, "received_at": rfc3339(r["received_at"])} for r in rows]

    # -- pipelines --------------------------------------------------------------------------

    def put_pipeline(self, name: str, data: bytes) -> str:
        """Store (or replace) a pipeline archive; returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        values = {"name": name, "sha256": sha, "data": data, "published_at": time.time()}
        insert = self._insert(pipelines).values(values)
        upsert = insert.on_conflict_do_update(
            index_elements=[pipelines.c.name],
            set_={k: insert.excluded[k] for k in values if k != "name"},
        )
        with self.engine.begin() as conn:
            self._durability(conn, "FULL")
            conn.execute(upsert)
        return sha

    def get_pipeline(self, name: str) -> tuple[bytes, str] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(pipelines.c.data, pipelines.c.sha256).where(pipelines.c.name == name)
            ).one_or_none()
        return None if row is None else (bytes(row.data), row.sha256)
