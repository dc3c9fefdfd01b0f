"""`imagefactory boot` and `imagefactory stop`: run nodes from an image, end kept ones."""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import click

from imagefactory.boot import launch, nodestate, seed
from imagefactory.boot.container import RUNTIMES, find_layout
from imagefactory.boot.waiting import BootedNode, check_runs
from imagefactory.cli.environments import DIGEST
from imagefactory.cli.node_options import NodeOptions, collect, node_options
from imagefactory.client import CA_ENV
from imagefactory.errors import die
from imagefactory.targets import Target, get_target, host_arch, target_names


def image_target(image: Path, name: str | None) -> Target:
    """--target, else the `target` in the manifest.json next to the image, else the host's."""
    if name is not None:
        return get_target(name)
    manifest = image.parent / "manifest.json"
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("target")
    except (OSError, ValueError, AttributeError):
        recorded = None
    return get_target(recorded if isinstance(recorded, str) else f"{host_arch()}-linux")


def run_ids(run_id: str | None, count: int) -> list[str]:
    """One run per node (a run holds one report): R or R-1..R-K, else fresh UUIDs."""
    if run_id is None:
        return [str(uuid.uuid4()) for _ in range(count)]
    return [run_id] if count == 1 else [f"{run_id}-{i}" for i in range(1, count + 1)]


def fleet(node: NodeOptions, count: int, guest_master: str | None) -> list[seed.NodeVars]:
    if node.token is not None and count > 1:
        raise die("a --token belongs to one node", hint="with --count, give --secret-file")
    ids = launch.node_ids(node.node_id, count)
    return [
        node.node_vars(i, r, guest_master, local_link=guest_master is not None)
        for i, r in zip(ids, run_ids(node.run_id, count), strict=True)
    ]


def progress(message: str) -> None:
    click.echo(message, err=True)


@click.command("boot")
@click.argument("image", type=click.Path(path_type=Path), required=False)
@click.option(
    "--from",
    "source",
    nargs=2,
    metavar="MASTER_URL DIGEST",
    help="Instead of IMAGE: download the VM image DIGEST from the store of the core services "
    "at MASTER_URL into the local cache (resumable, sha256-verified; with --admin-token-file, "
    "else the node's own token), then boot it. The node's master defaults to MASTER_URL.",
)
@node_options("The master's URL as the HOST sees it, e.g. http://127.0.0.1:8080.")
@click.option(
    "--target",
    type=click.Choice(target_names()),
    help="Default: from manifest.json next to the image, else the host's architecture.",
)
@click.option(
    "--backend",
    type=click.Choice(launch.BACKENDS),
    default="qemu",
    show_default=True,
    help="Plain QEMU processes, or domains on libvirtd (qemu:///system).",
)
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    help="Run IMAGE (a `bake --format oci` directory) as containers with this runtime "
    "(default for such a directory: runc). Each gets its own network namespace that "
    "reaches the master and nothing else.",
)
@click.option(
    "--accel",
    type=click.Choice(["auto", "kvm", "tcg"]),
    default="auto",
    show_default=True,
    help="auto: KVM if a probe boot works, else TCG.",
)
@click.option(
    "--wait",
    type=click.Choice(launch.WAITS),
    default="poweroff",
    show_default=True,
    help="What to wait for on every node (see docs/boot.md); with 'report', exit 1 "
    "when a node's run did not succeed.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=1),
    default=900.0,
    show_default=True,
    help="Seconds to wait; then exit 1 with the last console lines.",
)
@click.option("--keep", is_flag=True, help="Leave the nodes running and their files in place.")
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Boot K nodes NODE-ID-1..NODE-ID-K at once.",
)
@click.option("--memory", "memory_mib", type=click.IntRange(min=128), help="MiB per node.")
@click.option("--cpus", type=click.IntRange(min=1), default=2, show_default=True, help="Per node.")
@click.option(
    "--admin-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Ask the master's admin API for heartbeats and reports instead of the console.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def boot_command(
    image: Path | None,
    source: tuple[str, str] | None,
    target: str | None,
    backend: str,
    runtime: str | None,
    accel: str,
    wait: str,
    timeout_s: float,
    keep: bool,
    count: int,
    memory_mib: int | None,
    cpus: int,
    admin_token_file: Path | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Boot IMAGE as node(s) and wait until they are ready, report, or power off (exit).

    Each node boots from its own qcow2 overlay (the image is never modified), with a
    NoCloud seed, isolated user-mode networking (SSH forwarded from 127.0.0.1, the
    master forwarded into the guest), and its serial console in a log file. With
    --count K the nodes are NODE-ID-1..NODE-ID-K. Unless --keep (or --wait none), the
    VMs are killed and their overlays deleted on exit, Ctrl-C and timeout.

    IMAGE may also be the directory of a container image (`bake --format oci`): each
    node is then a container (--runtime, default runc) with the same node options and
    --wait conditions, its output in the node's console.log and its agent state
    directory kept as the node's state/ (results and combined log).

    With --from MASTER_URL DIGEST instead of IMAGE, the VM image comes from the store of
    the core services: downloaded into the local cache (an interrupted download resumes,
    the sha256 is checked before the file is used, a cached one is not downloaded again)
    and booted for the target the store recorded.
    """
    node = collect(kwargs)
    if node.master_ca_file is not None:  # --wait checks the master with the nodes' CA too
        os.environ.setdefault(CA_ENV, str(node.master_ca_file))
    if (image is None) == (source is None):
        raise die("give either IMAGE or --from MASTER_URL DIGEST", hint="see `boot --help`")
    if source is not None:
        if runtime is not None:
            raise die("--from boots VM images; --runtime is for container images")
        image, target = download(source, target, admin_token_file, node)
        node = dataclasses.replace(node, master=node.master or source[0])
    assert image is not None
    layout = find_layout(image)
    if runtime is not None or layout is not None:
        if layout is None:
            raise die(f"{image} is not a container image", hint="give a `bake --format oci` dir")
        if node.ssh_keys:
            raise die("container nodes have no SSH server; --ssh-key is for VM images")
        vm_only = {"--memory": memory_mib is not None, "--backend": backend != "qemu"}
        if given := [name for name, used in vm_only.items() if used]:
            raise die(f"{', '.join(given)}: for VM images, not container nodes")
        boot_containers(layout, runtime or "runc", node, count, wait, timeout_s, keep,
                        admin_token_file, as_json)  # fmt: skip
        return
    image = launch.find_image(image)
    the_target = image_target(image, target)
    guest_master = None
    if node.master is not None:
        from imagefactory.boot.qemu import master_forward

        guest_master = master_forward(node.master).guest_url
    admin_token = read_admin_token(admin_token_file)
    nodes = fleet(node, count, guest_master)
    if accel == "auto":
        from imagefactory.host.accel import pick_accelerator

        accel = pick_accelerator(the_target)
    plan = launch.BootPlan(
        image=image,
        target=the_target,
        backend=backend,
        accel=accel,
        wait=wait,
        timeout_s=timeout_s,
        keep=keep,
        master_url=node.master,
        admin_token=admin_token,
        memory_mib=memory_mib or the_target.memory_mib,
        cpus=cpus,
    )
    try:
        booted = launch.boot(plan, nodes, progress)
    except KeyboardInterrupt:
        kept = plan.keeps_nodes
        after = "the nodes keep running" if kept else "the nodes were stopped and removed"
        raise die(f"interrupted; {after}") from None
    finish(booted, as_json, plan.keeps_nodes, plan.wait, "imagefactory ssh NODE -- CMD; ")


def download(
    source: tuple[str, str], target: str | None, admin_token_file: Path | None, node: NodeOptions
) -> tuple[Path, str | None]:
    """`--from MASTER_URL DIGEST`: the VM image in the local cache (downloaded, resumed
    or found there) and its target: as the store recorded it (admin token), else
    --target, else the one its name says (a node's token may download but not list)."""
    from imagefactory.client import AdminClient
    from imagefactory.deploy.pull import cached, described, file_name

    url, digest = source
    if not DIGEST.fullmatch(digest):
        raise die(f"--from: {digest!r} is not a digest like sha256:<64 hex>")
    node_id = None if admin_token_file is not None else node.node_id
    token = read_admin_token(admin_token_file) or node.token_for(node.node_id)
    if token is None:
        raise die("--from needs --admin-token-file, or the node's --token or --secret-file")
    with AdminClient(url, token) as client:
        env = described(client, digest, node_id)
        name = file_name(env)
        if not name.endswith(".qcow2"):
            raise die(
                f"--from boots VM images (.qcow2); {digest} is {name}",
                hint="an oci environment runs on a container host, an installer over SSH",
            )
        recorded = env.get("target") or (name.removesuffix(".qcow2") if target is None else None)
        if target is not None and recorded is not None and target != recorded:
            raise die(f"--target {target}: {digest} was built for {recorded}")
        image = cached(client, digest, progress, env, node_id)
    return image, recorded if recorded in target_names() else target


def read_admin_token(path: Path | None) -> str | None:
    if path is None:
        return None
    from imagefactory.tokens import read_secret

    return read_secret(path)


def finish(booted: list[BootedNode], as_json: bool, kept: bool, wait: str, hint: str) -> None:
    """The JSON summary, how to stop kept nodes, and exit 1 for a run not succeeded."""
    if as_json:
        click.echo(json.dumps([n.summary() for n in booted], indent=2))
    if kept:
        ids = " ".join(n.record.node_id for n in booted)
        progress(f"running: {hint}stop with: imagefactory stop {ids}")
    if wait == "report":
        check_runs(booted)


def boot_containers(
    layout: Path,
    runtime: str,
    node: NodeOptions,
    count: int,
    wait: str,
    timeout_s: float,
    keep: bool,
    admin_token_file: Path | None,
    as_json: bool,
) -> None:
    from imagefactory.boot import container

    plan = container.ContainerPlan(
        layout, runtime, wait, timeout_s, keep, node.master, read_admin_token(admin_token_file)
    )
    nodes = fleet(node, count, None)
    try:
        booted = container.boot(plan, nodes, progress)
    except KeyboardInterrupt:
        after = "the containers keep running" if plan.keeps_nodes else "the containers were removed"
        raise die(f"interrupted; {after}") from None
    finish(booted, as_json, plan.keeps_nodes, wait, "")


@click.command("stop")
@click.argument("node_ids", nargs=-1)
@click.option("--all", "stop_all", is_flag=True, help="Stop every node booted with --keep.")
def stop_command(node_ids: tuple[str, ...], stop_all: bool) -> None:
    """Stop kept nodes: kill their VMs and delete their overlays; containers get SIGTERM
    (their run is cancelled and reported) and are removed."""
    if stop_all:
        node_ids = tuple(nodestate.booted_nodes())
    elif not node_ids:
        raise die("name the nodes to stop, or give --all")
    for node_id in node_ids:
        record = nodestate.load(node_id)
        launch.cleanup(record, launch.machine_of(record))
        click.echo(f"stopped {node_id}")
