"""Commands for the core services: `serve`, and the admin CLI around it (`token`, `nodes`,
`runs`, `report`, `logs`, `publish`)."""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from executor.pipeline import PipelineError, load_pipeline
from imagefactory.client import AdminClient, tls_verify
from imagefactory.errors import die
from imagefactory.paths import state_root
from imagefactory.server.config import (
    DEFAULT_LEASE_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    LOOPBACK_HOSTS,
    ServerConfig,
    database_url,
)
from imagefactory.server.schemas import ID_PATTERN
from imagefactory.tokens import builder_token, ensure_secret, node_token, read_secret

F = TypeVar("F", bound=Callable[..., Any])

STATE = state_root()
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def file_option(name: str, default: Path, envvar: str, help: str) -> Callable[[F], F]:
    return click.option(
        name,
        type=click.Path(dir_okay=False, path_type=Path),
        default=default,
        show_default=True,
        envvar=envvar,
        help=help,
    )


secret_option = file_option(
    "--secret-file",
    STATE / "secret",
    "IMAGEFACTORY_SECRET_FILE",
    "Fleet secret: node tokens are HMAC-SHA256(secret, node_id).",
)
admin_token_option = file_option(
    "--admin-token-file",
    STATE / "admin-token",
    "IMAGEFACTORY_ADMIN_TOKEN_FILE",
    "File holding the admin token.",
)


def _keep_tls(ctx: click.Context, param: click.Parameter, value: object) -> None:
    """The TLS options reach `client_tls` through the context, so that the commands' own
    signatures stay as they are."""
    ctx.meta[f"imagefactory.tls.{param.name}"] = value


def tls_options(f: F) -> F:
    """--ca-file, --client-cert/--client-key and --insecure of every client of the core
    services (docs/tls.md); read back with `client_tls(url)`."""
    path = click.Path(dir_okay=False, exists=True, path_type=Path)
    kept: dict[str, Any] = {"expose_value": False, "callback": _keep_tls}
    options = [
        click.option(
            "--ca-file",
            type=path,
            envvar="IMAGEFACTORY_CA",
            help="CA certificates (the fleet CA's bundle.crt) an https:// master is verified "
            "against; default: the system's.",
            **kept,
        ),
        click.option(
            "--client-cert",
            type=path,
            envvar="IMAGEFACTORY_CLIENT_CERT",
            help="Client certificate for a master with mutual TLS (serve --client-ca).",
            **kept,
        ),
        click.option(
            "--client-key", type=path, envvar="IMAGEFACTORY_CLIENT_KEY", help="Its key.", **kept
        ),
        click.option(
            "--insecure",
            is_flag=True,
            help="Allow plain http:// to a non-loopback address (the token travels unencrypted).",
            **kept,
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def tls_choice() -> tuple[Path | None, bool]:
    """(--ca-file, --insecure) of a command with `tls_options`, for tools other than
    httpx (skopeo)."""
    meta = click.get_current_context().meta
    ca_file: Path | None = meta.get("imagefactory.tls.ca_file")
    return ca_file, bool(meta.get("imagefactory.tls.insecure"))


def client_tls(url: str) -> ssl.SSLContext:
    """The TLS settings of a command with `tls_options`, for `url`."""
    meta = click.get_current_context().meta
    cert: Path | None = meta.get("imagefactory.tls.client_cert")
    key: Path | None = meta.get("imagefactory.tls.client_key")
    if (cert is None) != (key is None):
        raise die("--client-cert and --client-key go together")
    pair = None if cert is None or key is None else (cert, key)
    return tls_verify(url, *tls_choice(), pair)


def admin_options(f: F) -> F:
    f = tls_options(admin_token_option(f))
    return click.option(
        "--url",
        default=DEFAULT_URL,
        show_default=True,
        envvar="IMAGEFACTORY_URL",
        help="Base URL of the core services.",
    )(f)


def admin_client(url: str, admin_token_file: Path) -> AdminClient:
    return AdminClient(url, read_secret(admin_token_file), tls=client_tls(url))


def check_ident(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Ids and names go into URL paths: the server's pattern, checked before any request."""
    if value is not None and not re.fullmatch(ID_PATTERN, value):
        raise click.BadParameter(
            f"{value!r} is not 1-128 of [A-Za-z0-9_.-], starting with a letter or digit",
            param=param,
        )
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("-" if r.get(c) is None else str(r[c])) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    for line in [[c.upper() for c in columns], *cells]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port to listen on; 0 picks a free one (printed).",
)
@click.option(
    "--db",
    default=str(STATE / "core-services.db"),
    show_default=True,
    help="SQLite file, or a SQLAlchemy URL such as postgresql+psycopg://user@host/db.",
)
@secret_option
@admin_token_option
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=DEFAULT_MAX_BODY_BYTES,
    show_default=True,
    help="Larger request bodies get 413.",
)
@click.option(
    "--store-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Environment store (default: `environments` next to a SQLite --db, else under "
    "the state directory).",
)
@click.option("--registry", help="OCI registry (host:port) builders push container builds to.")
@click.option(
    "--lease-seconds",
    type=click.FloatRange(min=1, max=3600),
    default=DEFAULT_LEASE_S,
    show_default=True,
    help="A build whose builder is silent this long goes back to the queue.",
)
@click.option(
    "--build-attempts",
    type=click.IntRange(1, 100),
    default=DEFAULT_MAX_ATTEMPTS,
    show_default=True,
    help="Lease expiries after which a build fails instead of being requeued.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Serve HTTPS with this certificate (`imagefactory ca issue`); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The certificate's private key.",
)
@click.option(
    "--client-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Mutual TLS: every client must also present a certificate signed by this CA.",
)
def serve(
    host: str,
    port: int,
    db: str,
    secret_file: Path,
    admin_token_file: Path,
    max_body_bytes: int,
    store_dir: Path | None,
    registry: str | None,
    lease_seconds: float,
    build_attempts: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    client_ca: Path | None,
) -> None:
    """Serve the core services API (heartbeats, reports, pipelines, builds and the
    environment store) until Ctrl-C.

    Missing secret and admin token files are created with random content (mode 0600).
    Prints one line `listening on URL` once it accepts connections. Beyond one machine,
    serve HTTPS (--tls-cert/--tls-key, docs/tls.md): tokens travel in every request.
    """
    from imagefactory.cli.bake import FORMATS
    from imagefactory.server.listen import TlsFiles
    from imagefactory.server.listen import serve as run_server

    if (tls_cert is None) != (tls_key is None):
        raise die("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise die("--client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
    tls = None if tls_cert is None or tls_key is None else TlsFiles(tls_cert, tls_key, client_ca)

    for path, what in ((secret_file, "fleet secret"), (admin_token_file, "admin token")):
        if ensure_secret(path):
            click.echo(f"created {what} file {path}", err=True)
    if "://" not in db:
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
    if host not in LOOPBACK_HOSTS:
        click.echo(f"warning: listening on non-loopback address {host}", err=True)
        if tls is None:
            click.echo(
                "warning: without --tls-cert, node and admin tokens cross the network in "
                "plain text (see docs/tls.md)",
                err=True,
            )
    config = ServerConfig(
        db_url=database_url(db),
        secret=read_secret(secret_file),
        admin_token=read_secret(admin_token_file),
        max_body_bytes=max_body_bytes,
        store_dir=None if store_dir is None else store_dir.resolve(),
        formats=tuple(FORMATS),
        registry=registry,
        lease_s=lease_seconds,
        max_attempts=build_attempts,
    )

    def announce(url: str) -> None:
        click.echo(f"imagefactory serve: listening on {url}", nl=True)

    run_server(config, host, port, announce, tls)


@click.command()
@click.argument("node_id", callback=check_ident)
@secret_option
@click.option(
    "--builder", is_flag=True, help="NODE_ID names a build worker: print its builder token."
)
@json_option
def token(node_id: str, secret_file: Path, builder: bool, as_json: bool) -> None:
    """Print the bearer token of NODE_ID (HMAC-SHA256 of the fleet secret), or with
    --builder the token of build worker NODE_ID (a separate namespace)."""
    secret = read_secret(secret_file)
    value = builder_token(secret, node_id) if builder else node_token(secret, node_id)
    if as_json:
        print_json({"builder_id" if builder else "node_id": node_id, "token": value})
    else:
        click.echo(value)


@click.command()
@admin_options
@json_option
def nodes(url: str, admin_token_file: Path, as_json: bool) -> None:
    """List the nodes that sent heartbeats: run, state, last seen, alive."""
    with admin_client(url, admin_token_file) as client:
        rows = client.get_json("/v1/nodes")
    if as_json:
        print_json(rows)
        return
    for row in rows:
        row["alive"] = "yes" if row["alive"] else "NO"
        row["progress"] = f"{row['tasks_done']}/{row['tasks_total']}"
    print_table(rows, ["node_id", "run_id", "state", "progress", "last_seen", "alive"])


@click.command()
@admin_options
@click.option("--node", callback=check_ident, help="Only the runs of this node.")
@click.option("--limit", type=click.IntRange(1, 10000), default=50, show_default=True)
@json_option
def runs(url: str, admin_token_file: Path, node: str | None, limit: int, as_json: bool) -> None:
    """List the reported runs, newest first."""
    with admin_client(url, admin_token_file) as client:
        rows = client.get_json("/v1/runs", node=node, limit=limit)
    if as_json:
        print_json(rows)
    else:
        print_table(rows, ["run_id", "node_id", "pipeline", "status", "finished_at"])


def _error_text(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    message = str(error.get("message", "")).splitlines()
    return f"{error.get('type')}: {message[0] if message else ''}"[:80]


def run_command(f: F) -> F:
    """The options of a command about one run: RUN_ID, --url, --admin-token-file, --json."""
    argument = click.argument("run_id", callback=check_ident)
    return click.command()(argument(admin_options(json_option(f))))  # type: ignore[return-value]


def fetch_report(run_id: str, url: str, admin_token_file: Path) -> dict[str, Any]:
    with admin_client(url, admin_token_file) as client:
        data: dict[str, Any] = client.get_json(f"/v1/runs/{run_id}")
    return data


@run_command
def report(run_id: str, url: str, admin_token_file: Path, as_json: bool) -> None:
    """Show the report of RUN_ID: run status and the status of each task."""
    data = fetch_report(run_id, url, admin_token_file)
    if as_json:
        print_json({k: v for k, v in data.items() if k != "log"})
        return
    click.echo(
        f"run {data['run_id']}  node {data['node_id']}  pipeline {data['pipeline']}  "
        f"status {data['status']}  {data['started_at']} .. {data['finished_at']}"
    )
    rows = [
        {"task": task_id, **task, "error": _error_text(task.get("error"))}
        for task_id, task in data["tasks"].items()
    ]
    print_table(rows, ["task", "status", "attempts", "duration_s", "error"])


@run_command
def logs(run_id: str, url: str, admin_token_file: Path, as_json: bool) -> None:
    """Print the combined log of RUN_ID."""
    data = fetch_report(run_id, url, admin_token_file)
    if as_json:
        print_json({"run_id": run_id, "log": data["log"]})
    else:
        click.echo(data["log"], nl=False)


@click.command()
@click.argument("name", callback=check_ident)
@click.argument("archive", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@admin_options
@json_option
def publish(name: str, archive: Path, url: str, admin_token_file: Path, as_json: bool) -> None:
    """Publish ARCHIVE (a pipeline .tar.gz from `executor pack`) as NAME on the gateway.

    Nodes with EXECUTOR_PIPELINE=gateway:NAME download it. The archive is validated
    first, as `executor validate` does; an invalid one is not published.
    """
    try:
        load_pipeline(archive)  # what `executor validate` would refuse, nodes would too
    except PipelineError as exc:
        raise die(f"not published: {exc}") from None
    with admin_client(url, admin_token_file) as client:
        ack = client.put_bytes(f"/v1/pipelines/{name}", archive.read_bytes())
    if as_json:
        print_json(ack)
    else:
        click.echo(f"published {ack['name']}: sha256 {ack['sha256']} ({ack['size']} bytes)")
