"""`imagefactory deploy` and `undeploy`: environments onto the devices of the inventory
(docs/fleet.md), through imagefactory/deploy/."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from imagefactory.cli.install import progress  # one line at a time from device threads
from imagefactory.cli.services import (
    admin_client,
    admin_options,
    check_ident,
    json_option,
    secret_option,
    tls_choice,
)
from imagefactory.deploy.baremetal import SshAccess
from imagefactory.deploy.orchestrate import WAITS, Deployer, DeploySettings, DeviceResult
from imagefactory.deploy.transports import transports
from imagefactory.errors import die
from imagefactory.tokens import read_secret

F = TypeVar("F", bound=Callable[..., Any])


class DeployFailed(click.ClickException):
    """At least one device failed (exit 1); the summary above says which and why."""

    exit_code = 1


def check_devices(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    for device in value:
        check_ident(ctx, param, device)
    if len(set(value)) != len(value):
        raise click.BadParameter("a device is named twice", param=param)
    return list(value)


devices_argument = click.argument("devices", nargs=-1, required=True, callback=check_devices)


def ssh_options(f: F) -> F:
    """How this host logs in to bare-metal devices (as `imagefactory install` does)."""
    options = [
        click.option(
            "--identity-file",
            "-i",
            type=click.Path(dir_okay=False, exists=True, path_type=Path),
            help="SSH private key for bare-metal devices (default: the SSH agent and ~/.ssh keys).",
        ),
        click.option(
            "--known-hosts",
            type=click.Path(dir_okay=False, path_type=Path),
            default=Path("~/.ssh/known_hosts"),
            show_default=True,
            help="Trusted SSH host keys; a device's recorded fingerprint is trusted as well.",
        ),
        click.option(
            "--accept-new-host-key",
            is_flag=True,
            help="Trust a bare-metal device's key on first sight (recorded in --known-hosts).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def report(results: list[DeviceResult], as_json: bool, verb: str, cancelled: bool) -> None:
    if as_json:
        click.echo(json.dumps([r.summary() for r in results], indent=2))
    failed = [r for r in results if r.status == "failed"]
    progress(f"==> {len(results) - len(failed)} of {len(results)} device(s) {verb}")
    width = max(len(r.device) for r in results)
    for r in results:
        what = r.status + (f", {r.wait}" if r.wait else "")
        kind = f" {r.kind}" if r.kind else ""
        node = f" node {r.node_id}" if r.node_id else ""
        reason = f": {r.error}" if r.error else ""
        progress(f"  {r.device:<{width}}{kind}{node}: {what} ({r.elapsed_s:.0f} s){reason}")
    if cancelled:
        progress("interrupted; the summary above says where each device was left")
        raise click.exceptions.Exit(130)
    if failed:
        names = ", ".join(r.device for r in failed)
        raise DeployFailed(f"failed on {len(failed)} of {len(results)} device(s): {names}")


def deployer(url: str, admin_token_file: Path, identity_file: Path | None,
             known_hosts: Path, accept_new_host_key: bool) -> Deployer:  # fmt: skip
    client = admin_client(url, admin_token_file)
    access = SshAccess(known_hosts, identity_file, accept_new_host_key)
    return Deployer(client, transports(client, access, tls_choice()[0]), progress)


@click.command("deploy")
@devices_argument
@click.option(
    "--pipeline",
    "-p",
    required=True,
    help="A pipeline published on the gateway (`imagefactory publish`): NAME, or "
    "NAME@sha256:HEX to pin its content.",
)
@click.option(
    "--wait",
    type=click.Choice(WAITS),
    default="heartbeat",
    show_default=True,
    help="Wait for each node's first heartbeat, or for its report (exit 1 when a run "
    "did not succeed), as `boot --wait` does.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=1800.0,
    show_default=True,
    help="Seconds to wait per device for its heartbeat or report (after the build).",
)
@click.option(
    "--master",
    metavar="URL",
    help="The master's URL as the devices reach it (for vm and container: their "
    "hypervisor or container host); a device's record may give its own "
    "(`devices add --master-url`). Default: --url.",
)
@secret_option
@click.option(
    "--env",
    "env_pairs",
    multiple=True,
    metavar="K=V",
    help="Extra node.env variable for every node; repeatable.",
)
@click.option(
    "--on-complete",
    type=click.Choice(["none", "poweroff"]),
    default="none",
    show_default=True,
    help="What an agent does once its report is delivered; with `none` a VM or bare-metal "
    "node stays up until `undeploy` (a container ends with its run).",
)
@click.option(
    "--replace", is_flag=True, help="Undeploy what a device runs first, instead of refusing."
)
@ssh_options
@admin_options
@json_option
def deploy_command(
    devices: list[str],
    pipeline: str,
    wait: str,
    timeout_s: float,
    master: str | None,
    secret_file: Path,
    env_pairs: tuple[str, ...],
    on_complete: str,
    replace: bool,
    identity_file: Path | None,
    known_hosts: Path,
    accept_new_host_key: bool,
    url: str,
    admin_token_file: Path,
    as_json: bool,
) -> None:
    """Deploy PIPELINE to each DEVICE of the inventory (`imagefactory devices`).

    For each device, in parallel: pick the first kind in its preference list that has a
    target for its architecture; take that environment from the store, or build it now
    through the build queue and wait (builders must be running); get it onto the device
    (vm: uploaded into the hypervisor's storage pool through libvirt; container: the
    container host pulls the image by digest; baremetal: install.sh over SSH); start it
    with a fresh node id and run id; record the deployment on the master; wait. A
    device that fails does not stop the others; the summary names each failure and its
    cause (exit 1).

    --ca-file is also what the nodes verify an https:// master with; --insecure also
    lets them reach a plain http:// master over a network (EXECUTOR_INSECURE=1).
    """
    from imagefactory.boot.nodeenv import parse_assignment

    ca_file, insecure = tls_choice()
    node_master = master or url
    master_ca = None
    if ca_file is not None and node_master.startswith("https://"):
        from imagefactory import pki

        try:
            master_ca = pki.check_bundle(ca_file.read_bytes(), "--ca-file").decode("ascii")
        except pki.PkiError as exc:
            raise die(f"--ca-file: {exc}") from None
    settings = DeploySettings(
        pipeline=pipeline,
        master=node_master,
        secret=read_secret(secret_file),
        wait=wait,
        timeout_s=timeout_s,
        master_ca=master_ca,
        insecure=insecure,
        on_complete=on_complete,
        env=tuple(parse_assignment(p) for p in env_pairs),
        replace=replace,
    )
    fleet = deployer(url, admin_token_file, identity_file, known_hosts, accept_new_host_key)
    with fleet.client:
        fleet.check_known(devices)
        results = fleet.deploy(devices, settings)
    report(results, as_json, "deployed", fleet.cancelled.is_set())


@click.command("undeploy")
@devices_argument
@click.option(
    "--forget",
    is_flag=True,
    help="Only clear the deployment record; nothing on the device is touched (for a node "
    "removed by hand, or one a stopped deploy left unrecorded).",
)
@ssh_options
@admin_options
@json_option
def undeploy_command(
    devices: list[str],
    forget: bool,
    identity_file: Path | None,
    known_hosts: Path,
    accept_new_host_key: bool,
    url: str,
    admin_token_file: Path,
    as_json: bool,
) -> None:
    """Stop the node deploy started on each DEVICE and remove what deploy put there (the
    domain and its volumes, the container, the installed package); the deployment record
    is cleared once that is done. A device with nothing deployed is left as it is."""
    fleet = deployer(url, admin_token_file, identity_file, known_hosts, accept_new_host_key)
    with fleet.client:
        fleet.check_known(devices)
        results = fleet.undeploy(devices, forget)
    report(results, as_json, "undeployed", fleet.cancelled.is_set())
