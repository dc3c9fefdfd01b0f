"""`imagefactory ca`: the fleet's private certificate authority (docs/tls.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from imagefactory import pki
from imagefactory.cli.services import json_option
from imagefactory.errors import die
from imagefactory.paths import state_root

F = TypeVar("F", bound=Callable[..., Any])


def ca_dir_option(f: F) -> F:
    return click.option(
        "--ca-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=state_root() / "ca",
        show_default=True,
        envvar="IMAGEFACTORY_CA_DIR",
        help="Directory of the CA's key (0600) and certificates.",
    )(f)


def _done(as_json: bool, fields: dict[str, Any], line: str) -> None:
    if as_json:
        click.echo(json.dumps(fields))
    else:
        click.echo(line)


def new_ca_options(f: F) -> F:
    """--name and --days of a new CA certificate (`init`, `rotate`)."""
    f = click.option(
        "--days",
        type=click.IntRange(1, 36500),
        default=pki.CA_DAYS,
        show_default=True,
        help="Validity of the CA certificate.",
    )(f)
    return click.option(
        "--name",
        default="fleetbake fleet CA",
        show_default=True,
        callback=_check_ca_name,
        help=f"CA common name (1 to {pki.CN_MAX} printable characters, the X.509 limit).",
    )(f)


def _check_ca_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    """Checked while parsing, so a bad --name stops before the CA directory is touched."""
    try:
        return pki.check_common_name(value)
    except pki.PkiError as exc:
        raise die(f"--name: {exc}") from None


@click.group("ca")
def ca_group() -> None:
    """The fleet CA: make it, issue server and client certificates, rotate it.

    \b
    Typical set-up for a master reachable as master.example.net (docs/tls.md):
      imagefactory ca init
      imagefactory ca issue master --san master.example.net --san 127.0.0.1 --san 10.0.2.100
      imagefactory serve --host 0.0.0.0 --tls-cert CA_DIR/master.crt --tls-key CA_DIR/master.key
      imagefactory seed ... --master https://master.example.net:8750 --master-ca CA_DIR/bundle.crt
    """


@ca_group.command("init")
@ca_dir_option
@new_ca_options
@json_option
def init_command(ca_dir: Path, name: str, days: int, as_json: bool) -> None:
    """Create a new CA: ca.key (0600, stays on this machine), ca.crt and bundle.crt (public;
    bundle.crt is what clients and nodes trust)."""
    cert = _run(lambda: pki.create_ca(ca_dir, name, days))
    bundle = ca_dir / pki.BUNDLE
    _done(as_json, {"ca_cert": str(cert), "bundle": str(bundle)}, f"created CA {cert}")


@ca_group.command("issue")
@click.argument("name")
@ca_dir_option
@click.option(
    "--san",
    "sans",
    multiple=True,
    metavar="NAME|IP",
    help="A DNS name or IP address clients use to reach the server; repeatable. For the "
    "master include 10.0.2.100 (VMs of `imagefactory boot` reach it there) and 127.0.0.1 "
    "(containers and host-side commands).",
)
@click.option(
    "--client", is_flag=True, help="A client certificate (nodes, builders) for `serve --client-ca`."
)
@click.option(
    "--days",
    type=click.IntRange(1, 3650),
    default=pki.LEAF_DAYS,
    show_default=True,
    help="Validity (never beyond the CA's).",
)
@click.option(
    "--out-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where NAME.crt and NAME.key go (default: the CA directory).",
)
@json_option
def issue_command(
    name: str,
    ca_dir: Path,
    sans: tuple[str, ...],
    client: bool,
    days: int,
    out_dir: Path | None,
    as_json: bool,
) -> None:
    """Issue NAME.crt and a new NAME.key (0600) signed by the CA: a server certificate for
    the master, the registry or a builder (--san required), or with --client a client
    certificate."""
    issued = _run(lambda: pki.issue(ca_dir, name, sans, client=client, days=days, out_dir=out_dir))
    fields = {
        "cert": str(issued.cert),
        "key": str(issued.key),
        "sans": list(issued.sans),
        "not_after": issued.not_after.isoformat(),
    }
    until = issued.not_after.date().isoformat()
    _done(as_json, fields, f"issued {issued.cert} (key {issued.key}), valid until {until}")


@ca_group.command("rotate")
@ca_dir_option
@new_ca_options
@click.option(
    "--finish",
    is_flag=True,
    help="End a rotation: bundle.crt trusts only the current CA again.",
)
@json_option
def rotate_command(ca_dir: Path, name: str, days: int, finish: bool, as_json: bool) -> None:
    """Replace the CA. bundle.crt then holds the new and the previous CA certificate:
    hand it to every client, re-issue the server certificates, then run `--finish`."""
    if finish:
        bundle = _run(lambda: pki.finish_rotation(ca_dir))
        _done(as_json, {"bundle": str(bundle)}, f"{bundle} now trusts only the current CA")
        return
    bundle = _run(lambda: pki.rotate_ca(ca_dir, name, days))
    _done(as_json, {"bundle": str(bundle)}, f"new CA made; {bundle} trusts the new and old CA")


T = TypeVar("T")


def _run(step: Callable[[], T]) -> T:
    try:
        return step()
    except pki.PkiError as exc:
        raise die(str(exc)) from None
