"""Run the core services under uvicorn on a socket we bind ourselves, so that `--port 0`
works and the "listening" line carries the real port before the first request. With a
certificate they speak HTTPS through uvicorn's TLS support (docs/tls.md)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from imagefactory.errors import die
from imagefactory.server.app import create_app
from imagefactory.server.config import ServerConfig
from imagefactory.server.storage import Storage

BACKLOG = 4096


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None
    """With it, every client must present a certificate signed by one of these CAs."""

    def check(self) -> None:
        """Load the files as uvicorn will, so that a bad one is one clear line, not a
        traceback from inside the server."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key)
        except OSError as exc:
            raise die(
                f"cannot use --tls-cert {self.cert} with --tls-key {self.key}: {_why(exc)}",
                hint="issue them with `imagefactory ca issue NAME --san HOST`",
            ) from None
        if self.client_ca is not None:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except OSError as exc:
                raise die(f"cannot use --client-ca {self.client_ca}: {_why(exc)}") from None


def _why(exc: OSError) -> str:
    """ssl's own message for a TLS problem (a key that does not match), else the OS's."""
    if isinstance(exc, ssl.SSLError) or not exc.strerror:
        return str(exc)
    return exc.strerror


def open_storage(url: str) -> Storage:
    try:
        return Storage(url)
    except ImportError as exc:
        raise die(f"no database driver for {url}: {exc}", hint="pip install psycopg") from None
    except (SQLAlchemyError, ValueError) as exc:
        raise die(f"cannot open database {url}: {exc}") from None


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise die(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(BACKLOG)
    return sock


def base_url(sock: socket.socket, scheme: str = "http") -> str:
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def serve(
    config: ServerConfig,
    host: str,
    port: int,
    on_listening: Callable[[str], None],
    tls: TlsFiles | None = None,
) -> None:
    """Open the database, bind, announce the URL, then serve until SIGINT or SIGTERM."""
    if tls is not None:
        tls.check()
    storage = open_storage(config.db_url)
    sock = bind(host, port)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, storage),
            log_level="warning",
            access_log=False,
            backlog=BACKLOG,
            timeout_keep_alive=75,
            ssl_certfile=None if tls is None else tls.cert,
            ssl_keyfile=None if tls is None else tls.key,
            ssl_ca_certs=None if tls is None or tls.client_ca is None else str(tls.client_ca),
            ssl_cert_reqs=ssl.CERT_NONE
            if tls is None or tls.client_ca is None
            else ssl.CERT_REQUIRED,
        )
    )
    on_listening(base_url(sock, "http" if tls is None else "https"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        storage.close()
