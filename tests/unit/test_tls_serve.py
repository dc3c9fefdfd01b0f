"""`serve`'s TLS options before anything listens: the warning for a non-loopback bind
without a certificate, and what reaches the server (the server itself is faked here; the
integration tests run the real one on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from imagefactory.cli.main import main
from imagefactory.server import listen

PLAIN = "without --tls-cert, node and admin tokens cross the network in plain text"


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake(config: object, host: str, port: int, on_listening: object, tls: object) -> None:
        calls.append({"host": host, "tls": tls})

    monkeypatch.setattr(listen, "serve", fake)
    return calls


def serve(tmp_path: Path, *args: str) -> tuple[int, str]:
    files = ["--db", str(tmp_path / "db"), "--secret-file", str(tmp_path / "s")]
    files += ["--admin-token-file", str(tmp_path / "a")]
    done = CliRunner().invoke(main, ["serve", *files, *args])
    return done.exit_code, done.stderr


def test_non_loopback_without_a_certificate_warns(
    tmp_path: Path, served: list[dict[str, Any]]
) -> None:
    code, err = serve(tmp_path, "--host", "0.0.0.0")
    assert code == 0 and PLAIN in err and served == [{"host": "0.0.0.0", "tls": None}]


def test_loopback_or_a_certificate_does_not_warn(
    tmp_path: Path, served: list[dict[str, Any]]
) -> None:
    assert PLAIN not in serve(tmp_path)[1]
    cert, key, ca = tmp_path / "m.crt", tmp_path / "m.key", tmp_path / "ca.crt"
    args = ["--host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key)]
    code, err = serve(tmp_path, *args, "--client-ca", str(ca))
    assert code == 0 and PLAIN not in err
    assert served[-1]["tls"] == listen.TlsFiles(cert, key, ca)
