"""`imagefactory devices add|list|show|remove`: the device inventory of the core services
(docs/devices.md). Every value is checked here, with the checks the server makes, before
any request is sent."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from imagefactory.cli.services import (
    admin_client,
    admin_options,
    check_ident,
    json_option,
    print_json,
    print_table,
)
from imagefactory.errors import die
from imagefactory.install.hostkeys import check_fingerprint
from imagefactory.kinds import ARCHS, KIND_NAMES
from imagefactory.reach import (
    LOCAL_CONTAINER_HOST,
    RUNTIMES,
    check_container_host,
    check_libvirt_uri,
    check_master_url,
    check_runtime,
    check_ssh_address,
)

REACH_OPTION = {"vm": "--libvirt-uri", "container": "--container-host", "baremetal": "--ssh"}
DETAIL_OPTIONS = (
    ("--libvirt-uri", "--pool"),
    ("--container-host", "--runtime"),
    ("--ssh", "--host-key-fingerprint"),
)
REACH_HINT = {
    "vm": "qemu:///system for this machine's libvirtd, qemu+ssh://root@HOST/system for another",
    "container": f"{LOCAL_CONTAINER_HOST} for this machine, ssh://USER@HOST for docker/podman",
    "baremetal": "USER@HOST[:PORT], as `imagefactory install --ssh` takes it",
}


def _checked_by(check: Callable[[str], str]) -> Callable[..., str | None]:
    """A click callback that runs one of imagefactory/reach.py's checks."""

    def callback(_ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param=param) from None

    return callback


device_id_argument = click.argument("device_id", metavar="ID", callback=check_ident)


@click.group("devices")
def devices_group() -> None:
    """The devices a fleet runs on: what each can run (architecture, environment kinds
    in order of preference) and how to reach it. `imagefactory deploy` reads them."""


@devices_group.command("add")
@device_id_argument
@click.option("--arch", required=True, type=click.Choice(ARCHS), help="The device's CPU.")
@click.option(
    "--kind",
    "kinds",
    required=True,
    multiple=True,
    type=click.Choice(KIND_NAMES),
    help="An environment kind it runs; repeat in order of preference (deploy takes the "
    "first the services can build).",
)
@click.option(
    "--libvirt-uri",
    callback=_checked_by(check_libvirt_uri),
    help="For --kind vm: the hypervisor, qemu:///system or qemu+ssh://USER@HOST/system.",
)
@click.option("--pool", callback=check_ident, help="libvirt storage pool  [default: default]")
@click.option(
    "--container-host",
    callback=_checked_by(check_container_host),
    help="For --kind container: `local` (where deploy runs) or ssh://USER@HOST[:PORT].",
)
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    help="Container runtime: runc (local only; the default there), docker or podman.",
)
@click.option(
    "--ssh",
    "ssh_address",
    metavar="USER@HOST[:PORT]",
    callback=_checked_by(check_ssh_address),
    help="For --kind baremetal: where `imagefactory install` reaches it.",
)
@click.option(
    "--host-key-fingerprint",
    callback=_checked_by(check_fingerprint),
    help="The device's SSH host key fingerprint (`ssh-keygen -lf`), trusted on deploy.",
)
@click.option(
    "--master-url",
    metavar="URL",
    callback=_checked_by(check_master_url),
    help="The master's URL as this device (for vm and container: its hypervisor or "
    "container host) reaches it, when that is not deploy's --master: another network, "
    "a forward.",
)
@admin_options
@json_option
def add_command(
    device_id: str,
    arch: str,
    kinds: tuple[str, ...],
    libvirt_uri: str | None,
    pool: str | None,
    container_host: str | None,
    runtime: str | None,
    ssh_address: str | None,
    host_key_fingerprint: str | None,
    master_url: str | None,
    url: str,
    admin_token_file: Path,
    as_json: bool,
) -> None:
    """Add device ID, or replace its record (what is deployed on it is kept).

    \b
    imagefactory devices add hv1-vm --arch x86_64 --kind vm \\
        --libvirt-uri qemu+ssh://root@hv1/system
    imagefactory devices add edge-7 --arch aarch64 --kind container --kind baremetal \\
        --container-host ssh://ops@edge-7 --runtime podman --ssh root@edge-7

    The services refuse a device none of whose kinds they can build for its
    architecture, naming what they support.
    """
    body = _device_body(
        arch,
        kinds,
        libvirt=(libvirt_uri, pool),
        container=(container_host, runtime),
        ssh=(ssh_address, host_key_fingerprint),
    )
    if master_url is not None:
        body["master_url"] = master_url
    with admin_client(url, admin_token_file) as client:
        device = client.put_json(f"/v1/devices/{device_id}", body)
    if as_json:
        print_json(device)
        return
    verb = "added" if device["created_at"] == device["updated_at"] else "replaced"
    click.echo(f"{verb} device {device_id}: {device['arch']}, {', '.join(device['kinds'])}")


Pair = tuple[str | None, str | None]


def _device_body(
    arch: str, kinds: tuple[str, ...], libvirt: Pair, container: Pair, ssh: Pair
) -> dict[str, Any]:
    """The PUT body from the options; each reach is (where, detail): (--libvirt-uri,
    --pool), (--container-host, --runtime), (--ssh, --host-key-fingerprint). A missing or
    stray option is a one-line error here, not a 400."""
    if len(set(kinds)) != len(kinds):
        raise die(f"--kind {' --kind '.join(kinds)} names a kind twice")
    given = {"vm": libvirt, "container": container, "baremetal": ssh}
    for kind in kinds:
        if given[kind][0] is None:
            raise die(f"--kind {kind} needs {REACH_OPTION[kind]}", hint=REACH_HINT[kind])
    for (where, detail), (where_option, detail_option) in zip(
        (libvirt, container, ssh), DETAIL_OPTIONS, strict=True
    ):
        if detail is not None and where is None:
            raise die(f"{detail_option} goes with {where_option}")
    body: dict[str, Any] = {"arch": arch, "kinds": list(kinds)}
    uri, pool = libvirt
    if uri is not None:
        body["libvirt"] = {"uri": uri, "pool": pool or "default"}
    host, runtime = container
    if host is not None:
        try:
            body["container"] = {"host": host, "runtime": check_runtime(host, runtime or "runc")}
        except ValueError as exc:
            raise die(f"--runtime: {exc}") from None
    address, fingerprint = ssh
    if address is not None:
        body["ssh"] = {"address": address, "host_key_fingerprint": fingerprint}
    return body


@devices_group.command("list")
@admin_options
@json_option
def list_command(url: str, admin_token_file: Path, as_json: bool) -> None:
    """List the devices: architecture, kinds, and what is deployed on each."""
    with admin_client(url, admin_token_file) as client:
        devices = client.get_json("/v1/devices")
    if as_json:
        print_json(devices)
        return
    rows = [
        {
            "id": d["id"],
            "arch": d["arch"],
            "kinds": ",".join(d["kinds"]),
            "reach": " ".join(f"{way}={how.split()[0]}" for way, how in _reach(d)),
            "deployed": _deployed(d["deployment"]),
        }
        for d in devices
    ]
    print_table(rows, ["id", "arch", "kinds", "reach", "deployed"])


@devices_group.command("show")
@device_id_argument
@admin_options
@json_option
def show_command(device_id: str, url: str, admin_token_file: Path, as_json: bool) -> None:
    """Show device ID: how to reach it and its deployment."""
    with admin_client(url, admin_token_file) as client:
        device = client.get_json(f"/v1/devices/{device_id}")
    if as_json:
        print_json(device)
        return
    click.echo(f"device {device['id']}  arch {device['arch']}  kinds {', '.join(device['kinds'])}")
    for way, how in _reach(device):
        click.echo(f"  {way:<10} {how}")
    deployment = device["deployment"]
    if deployment is None:
        click.echo(f"  {'deployed':<10} nothing")
    else:
        click.echo(
            f"  {'deployed':<10} {deployment['kind']} {deployment['target']} "
            f"{deployment['environment']}\n"
            f"             node {deployment['node_id']}  run {deployment['run_id']}  "
            f"since {deployment['deployed_at']}"
        )
    click.echo(f"  added {device['created_at']}  changed {device['updated_at']}")


@devices_group.command("remove")
@device_id_argument
@click.option(
    "--force",
    is_flag=True,
    help="Also forget a device with a deployment (what runs there is left running).",
)
@admin_options
@json_option
def remove_command(
    device_id: str, force: bool, url: str, admin_token_file: Path, as_json: bool
) -> None:
    """Forget device ID. One with a deployment is refused unless --force: undeploy it
    first (`imagefactory undeploy ID`), or what runs there is no longer recorded."""
    path = f"/v1/devices/{device_id}"
    with admin_client(url, admin_token_file) as client:
        deployment = client.get_json(path)["deployment"]
        if deployment is not None and not force:
            raise die(
                f"device {device_id} has a deployment ({_deployed(deployment)}); removing "
                "the record would leave it running unrecorded",
                hint=f"`imagefactory undeploy {device_id}` first, or --force",
            )
        # Without --force the server deletes only a device without a deployment, in one
        # statement: one deploy recorded since the look above is not lost (409).
        client.delete(path, if_undeployed=None if force else "true")
    if as_json:
        print_json({"id": device_id, "removed": True, "deployment": deployment})
    else:
        click.echo(f"removed device {device_id}")


def _reach(device: dict[str, Any]) -> list[tuple[str, str]]:
    """How to reach the device: (way, how) for each way it has."""
    ways = []
    if device["libvirt"] is not None:
        ways.append(("libvirt", f"{device['libvirt']['uri']}  pool {device['libvirt']['pool']}"))
    if device["container"] is not None:
        ways.append(
            ("container", f"{device['container']['host']}  {device['container']['runtime']}")
        )
    if device["ssh"] is not None:
        key = device["ssh"]["host_key_fingerprint"]
        ways.append(("ssh", device["ssh"]["address"] + (f"  host key {key}" if key else "")))
    return ways


def _deployed(deployment: dict[str, Any] | None) -> str | None:
    if deployment is None:
        return None
    return f"{deployment['kind']} node {deployment['node_id']}"
