"""Node tokens: `hex(HMAC-SHA256(secret, node_id))` (docs/reference/http-api.md); builder
tokens: `hex(HMAC-SHA256(secret, "builder:" + builder_id))`.

The server keeps no token table: it derives the token of the node (or builder) a request
names and compares. The seed maker uses the same derivation to give each node its token.
Ids never contain `:`, so no node token is ever a builder token, whatever the two ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from imagefactory.errors import die


def node_token(secret: str, node_id: str) -> str:
    """The bearer token of `node_id` under `secret` (the secret file's stripped text)."""
    return hmac.new(secret.encode(), node_id.encode(), hashlib.sha256).hexdigest()


def builder_token(secret: str, builder_id: str) -> str:
    """The bearer token of build worker `builder_id`: the node scheme in its own namespace."""
    return node_token(secret, f"builder:{builder_id}")


def tokens_equal(given: str, expected: str) -> bool:
    """Compare in constant time, so the response time leaks nothing about the token."""
    return hmac.compare_digest(given.encode(), expected.encode())


def read_secret(path: str | os.PathLike[str]) -> str:
    """The content of a secret or token file, whitespace-stripped; a clear error otherwise."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise die(f"secret file {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise die(f"cannot read secret file {file}: {exc}") from None
    if not text:
        raise die(f"secret file {file} is empty")
    return text


def ensure_secret(path: str | os.PathLike[str]) -> bool:
    """Create `path` with a fresh random secret (mode 0600) unless it exists; True if created."""
    file = Path(path)
    if file.exists():
        return False
    file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_hex(32) + "\n")
    return True
