"""The server's settings, resolved once from the command line into a frozen value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 8750
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def database_url(db: str) -> str:
    """`--db` takes a SQLAlchemy URL (`postgresql+psycopg://...`) or a SQLite file path."""
    if "://" in db:
        return db
    return f"sqlite:///{Path(db).expanduser().resolve()}"


@dataclass(frozen=True)
class ServerConfig:
    db_url: str
    """SQLAlchemy database URL; a SQLite file runs in WAL mode."""
    secret: str
    """The fleet secret: node tokens are HMAC-SHA256(secret, node_id)."""
    admin_token: str
    """The bearer token that publishes pipelines and reads everything."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Larger request bodies get 413, judged by Content-Length before the body is read."""
