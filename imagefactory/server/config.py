"""The server's settings, resolved once from the command line into a frozen value."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imagefactory.paths import state_root

DEFAULT_PORT = 8750
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_LEASE_S = 60.0
DEFAULT_MAX_ATTEMPTS = 3
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
    """Larger request bodies get 413, judged by Content-Length (server/limits.py)."""
    store_dir: Path | None = None
    """Environment store (content-addressed blobs, uploads in progress); None: next to a
    SQLite database, else under the state directory."""
    formats: tuple[str, ...] = ()
    """The formats `imagefactory bake` knows; a build of another format is refused."""
    registry: str | None = None
    """OCI registry (host:port, or a URL) that builders push container environments to."""
    lease_s: float = DEFAULT_LEASE_S
    """A claimed build whose builder sends no heartbeat for this long is requeued."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """A build whose lease expired this many times fails instead of being requeued."""

    def environment_store(self) -> Path:
        if self.store_dir is not None:
            return self.store_dir
        if self.db_url.startswith("sqlite:///"):
            return Path(self.db_url.removeprefix("sqlite:///")).parent / "environments"
        return state_root() / "environments"
