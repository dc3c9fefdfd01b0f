"""The device inventory in the services' database (table `devices`, storage.py): what each
device is, how to reach it, and what deploy last put on it.

Every write is one statement decided by the primary key (an upsert, an UPDATE or a
DELETE), so server replicas sharing one PostgreSQL need no locks. Replacing a device
keeps its deployment: undeploy still finds what is on it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from imagefactory.server.storage import devices, dialect_insert, rfc3339


class DeviceStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        insert = dialect_insert(engine, devices)
        self._upsert = insert.on_conflict_do_update(
            index_elements=[devices.c.device_id],
            set_={
                "spec": insert.excluded.spec,
                "updated_at": insert.excluded.updated_at,
                "version": devices.c.version + 1,
            },
        ).returning(*devices.c)

    def put(self, device_id: str, spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create or replace a device: (the device, True if it is new)."""
        now = time.time()
        row = {
            "device_id": device_id,
            "spec": json.dumps(spec, separators=(",", ":")),
            "version": 1,
            "created_at": now,
            "updated_at": now,
        }
        with self.engine.begin() as conn:
            _durable(conn)
            stored = conn.execute(self._upsert, row).mappings().one()
        return _view(stored), stored["version"] == 1

    def get(self, device_id: str) -> dict[str, Any] | None:
        query = sa.select(devices).where(devices.c.device_id == device_id)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().one_or_none()
        return None if row is None else _view(row)

    def listing(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(devices).order_by(devices.c.device_id)).mappings()
            return [_view(r) for r in rows]

    def delete(self, device_id: str, if_undeployed: bool = False) -> bool:
        """Forget a device (with `if_undeployed`, only one without a deployment, decided in
        the same statement); False if none was deleted."""
        delete = sa.delete(devices).where(devices.c.device_id == device_id)
        if if_undeployed:
            delete = delete.where(devices.c.deployment.is_(None))
        with self.engine.begin() as conn:
            _durable(conn)
            done = conn.execute(delete)
        return done.rowcount > 0

    def set_deployment(
        self, device_id: str, deployment: dict[str, Any] | None, if_undeployed: bool = False
    ) -> dict[str, Any] | None:
        """Record (or with None clear) the deployment; the device, or None if unknown (or,
        with `if_undeployed`, when it has a deployment: decided in the same statement)."""
        update = (
            sa.update(devices)
            .where(devices.c.device_id == device_id)
            .values(
                deployment=None if deployment is None else json.dumps(deployment),
                deployed_at=None if deployment is None else time.time(),
            )
            .returning(*devices.c)
        )
        if if_undeployed:
            update = update.where(devices.c.deployment.is_(None))
        with self.engine.begin() as conn:
            _durable(conn)
            row = conn.execute(update).mappings().one_or_none()
        return None if row is None else _view(row)


def _durable(conn: sa.Connection) -> None:
    """SQLite: the inventory is committed with a sync (FULL), as reports are; the
    connection may come from the pool set to NORMAL by a heartbeat commit."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA synchronous=FULL")


def _view(row: Any) -> dict[str, Any]:
    """A device as the API shows it."""
    deployment = None
    if row["deployment"] is not None:
        deployment = {**json.loads(row["deployment"]), "deployed_at": rfc3339(row["deployed_at"])}
    return {
        "id": row["device_id"],
        **json.loads(row["spec"]),
        "deployment": deployment,
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
    }
