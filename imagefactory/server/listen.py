"""Run the core services under uvicorn on a socket we bind ourselves, so that `--port 0`
works and the "listening" line carries the real port before the first request."""

from __future__ import annotations

import socket
from collections.abc import Callable

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from imagefactory.errors import die
from imagefactory.server.app import create_app
from imagefactory.server.config import ServerConfig
from imagefactory.server.storage import Storage

BACKLOG = 4096


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


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(config: ServerConfig, host: str, port: int, on_listening: Callable[[str], None]) -> None:
    """Open the database, bind, announce the URL, then serve until SIGINT or SIGTERM."""
    storage = open_storage(config.db_url)
    sock = bind(host, port)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config, storage),
            log_level="warning",
            access_log=False,
            backlog=BACKLOG,
            timeout_keep_alive=75,
        )
    )
    on_listening(base_url(sock))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        storage.close()
