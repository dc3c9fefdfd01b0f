"""Node token derivation and secret files."""

from __future__ import annotations

import hashlib
import hmac
import stat
from pathlib import Path

import pytest

from imagefactory.errors import UserError
from imagefactory.tokens import ensure_secret, node_token, read_secret, tokens_equal


def test_node_token_is_hex_hmac_sha256_of_node_id() -> None:
    expected = hmac.new(b"s3cret", b"node-1", hashlib.sha256).hexdigest()
    assert node_token("s3cret", "node-1") == expected
    assert node_token("s3cret", "node-2") != expected
    assert len(expected) == 64


def test_tokens_equal() -> None:
    assert tokens_equal("abc", "abc")
    assert not tokens_equal("abc", "abd")


def test_read_secret_strips_whitespace(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("  s3cret\n\n")
    assert read_secret(f) == "s3cret"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), ("  \n", "is empty"), (b"\xff\xfe", "cannot read")],
)
def test_read_secret_errors(tmp_path: Path, content: str | bytes | None, message: str) -> None:
    f = tmp_path / "secret"
    if isinstance(content, str):
        f.write_text(content)
    elif isinstance(content, bytes):
        f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_secret(f)


def test_ensure_secret_creates_once_with_mode_0600(tmp_path: Path) -> None:
    f = tmp_path / "dir" / "secret"
    assert ensure_secret(f) is True
    first = read_secret(f)
    assert len(first) == 64
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert ensure_secret(f) is False
    assert read_secret(f) == first
