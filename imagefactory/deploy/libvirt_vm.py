"""A VM node on a libvirt hypervisor, local (`qemu:///system`) or remote (`qemu+ssh://`):
everything goes through the libvirt connection, nothing through a local file system.

    place_vm:  connect ─► pool ─► base volume of the digest (sparse upload, once)
               ─► node overlay backed by it + seed ISO volume ─► define + start
               `fleetbake-<node>` ─► details for the deployment record
    remove_vm: destroy + undefine (with NVRAM) ─► delete the node's volumes
               (the base volume stays: other nodes of the digest share it)

The domain is boot's (imagefactory.boot.libvirt_backend) with its disks as pool volumes,
its serial console in a file beside them (a volume too, readable over the connection),
QEMU running as the hypervisor's QEMU user, and the same isolated user-mode network: SSH
forwarded from the hypervisor's 127.0.0.1 only, the master through a guestfwd whose relay
is socat on the hypervisor (the domain's QEMU runs as the hypervisor's QEMU user, which
cannot be assumed to run imagefactory's Python).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.boot import libvirt_backend, qemu, seed
from imagefactory.deploy import libvirt_domain, libvirt_pool
from imagefactory.errors import HostError, die
from imagefactory.run import CommandError, run
from imagefactory.targets import Target

Say = Callable[[str], None]
CONSOLE_TAIL_BYTES = 64 * 1024


def image_info(image: Path) -> libvirt_pool.ImageInfo:
    """The local environment image's sizes; it must be a self-contained qcow2."""
    try:
        info = json.loads(run(qemu.image_info_argv(image)).stdout)
    except CommandError as exc:
        raise die(f"{image} is not a disk image QEMU can read: {exc}") from None
    if info.get("format") != "qcow2" or "backing-filename" in info:
        raise die(f"{image} is not a self-contained qcow2 image")
    return libvirt_pool.ImageInfo(size=image.stat().st_size, virtual_size=info["virtual-size"])


def guest_node(
    node: seed.NodeVars, master: str | None
) -> tuple[seed.NodeVars, qemu.MasterForward | None]:
    """The node as the guest sees the master, and the forward that gets it there.
    `master` is the master as the HYPERVISOR reaches it; plain http:// is accepted only
    when that stays on the hypervisor's loopback (or the caller said insecure)."""
    if master is None:
        return dataclasses.replace(node, master_url=None), None
    forward = qemu.master_forward(master, relay="socat", loopback_only=False)
    plain = master.startswith("http://")
    if plain and not (forward.on_loopback or node.insecure):
        raise die(
            f"plain http:// master {forward.host} is not on the hypervisor's loopback",
            hint="serve the master over https:// with the fleet CA (imagefactory ca)",
        )
    insecure = node.insecure or plain
    return dataclasses.replace(node, master_url=forward.guest_url, insecure=insecure), forward


@dataclass(frozen=True)
class Wanted:
    """One node to place: what place_vm was asked for, checked and resolved."""

    uri: str
    pool: str
    image: Path
    info: libvirt_pool.ImageInfo
    base: str
    """The environment's base volume name."""
    target: Target
    node: seed.NodeVars
    """As the guest sees the master, with host_key as its SSH host key."""
    host_key: seed.HostKey
    forward: qemu.MasterForward | None
    memory_mib: int
    cpus: int

    @property
    def domain(self) -> str:
        return f"fleetbake-{self.node.node_id}"

    @property
    def volumes(self) -> dict[str, str]:
        return libvirt_pool.node_volume_names(self.node.node_id)


def place_vm(
    uri: str,
    pool: str,
    image: Path,
    digest: str,
    target: Target,
    node: seed.NodeVars,
    master: str | None,
    progress: Say,
    memory_mib: int | None = None,
    cpus: int = 2,
    accel: str | None = None,
) -> dict[str, Any]:
    """Put the environment DIGEST (local file IMAGE) into POOL on the hypervisor at URI and
    start it as NODE; returns the deployment details remove_vm takes. `accel`: None picks
    KVM when the hypervisor has it (checked by the real probe on this host)."""
    seed.check_node_id(node.node_id)
    guest, forward = guest_node(node, master)
    host_key = node.host_key or seed.HostKey.generate()  # pinned in the details
    wanted = Wanted(
        uri=uri,
        pool=pool,
        image=image,
        info=image_info(image),
        base=libvirt_pool.base_volume_name(digest),
        target=target,
        node=dataclasses.replace(guest, host_key=host_key),
        host_key=host_key,
        forward=forward,
        memory_mib=memory_mib or target.memory_mib,
        cpus=cpus,
    )
    with libvirt_domain.connected(uri) as conn:
        return _place(conn, wanted, accel, progress)


def _place(conn: Any, wanted: Wanted, accel: str | None, progress: Say) -> dict[str, Any]:
    pool = libvirt_pool.open_pool(conn, wanted.pool, wanted.uri)
    directory = libvirt_pool.pool_directory(pool)
    chosen = libvirt_domain.pick_accel(conn, wanted.uri, wanted.target, accel)
    owner = libvirt_domain.qemu_owner(conn, "kvm" if chosen == "kvm" else "qemu")
    progress(f"hypervisor {wanted.uri}: pool {wanted.pool} ({directory}), {chosen}, "
             f"QEMU as uid {owner.uid}")  # fmt: skip
    names = wanted.volumes
    details: dict[str, Any] = {
        "uri": wanted.uri,
        "pool": wanted.pool,
        "domain": wanted.domain,
        "volumes": [names["disk"], names["seed"], names["console"]],
        "kept_volumes": [wanted.base],
    }
    _remove(conn, details, wanted.pool, progress)  # a leftover of an interrupted deploy
    base, _ = libvirt_pool.upload_base(
        pool, wanted.base, wanted.image, wanted.info, owner, progress
    )
    try:
        libvirt_pool.create_overlay(pool, names["disk"], base, wanted.info, owner)
        iso = seed.iso_bytes(seed.render_seed(wanted.node))
        libvirt_pool.upload_bytes(pool, names["seed"], iso, owner)
        config = qemu.VmConfig(
            name=wanted.domain,
            target=wanted.target,
            accel=chosen,
            disk=Path(directory / names["disk"]),
            seed=Path(directory / names["seed"]),
            console_log=Path(directory / names["console"]),
            ssh_port=0,  # QEMU picks a free port on the hypervisor's 127.0.0.1
            master=wanted.forward,
            memory_mib=wanted.memory_mib,
            cpus=wanted.cpus,
        )
        xml = libvirt_backend.domain_xml(config, owner.uid, owner.gid, pool=wanted.pool)
        dom = libvirt_domain.start_domain(conn, xml, wanted.domain)
    except BaseException:
        with contextlib.suppress(Exception):
            _remove(conn, details, wanted.pool, progress)
        raise
    try:
        port = libvirt_backend.ssh_forward_port(dom)
    except HostError as exc:  # the node runs all the same; only `ssh` is not recorded
        progress(f"domain {wanted.domain}: {exc.message}")
        port = None
    if port is not None:
        details["ssh"] = f"127.0.0.1:{port}"  # on the hypervisor
    details["ssh_host_key"] = wanted.host_key.public
    details["accel"] = chosen
    progress(f"domain {wanted.domain}: started on {wanted.uri}")
    return details


def _remove(conn: Any, details: dict[str, Any], pool: str, progress: Say) -> None:
    if libvirt_domain.remove_domain(conn, details["domain"]):
        progress(f"domain {details['domain']}: destroyed and undefined")
    the_pool = libvirt_backend.lookup(conn.storagePoolLookupByName, pool)
    if the_pool is None:
        progress(f"pool {pool}: gone, and the node's volumes with it")
        return
    if not the_pool.isActive():
        raise die(
            f"storage pool {pool!r} is not active: the node's volumes stay in it",
            hint="start the pool (virsh pool-start) and undeploy again",
        )
    libvirt_pool.refresh(the_pool)  # the console log is a volume only once libvirt looked
    for name in details["volumes"]:
        if libvirt_pool.delete_volume(the_pool, name):
            progress(f"volume {name}: deleted")


def checked_details(details: dict[str, Any]) -> dict[str, Any]:
    """The details of a deployment record, refused unless they name only what place_vm
    creates: undeploy must not be steered into deleting other domains or volumes."""
    try:
        uri, pool, domain, volumes = (details[k] for k in ("uri", "pool", "domain", "volumes"))
    except (KeyError, TypeError):
        raise die("the deployment record has no libvirt details") from None
    prefix = libvirt_pool.PREFIX
    names = volumes if isinstance(volumes, list) else [None]
    if not (
        isinstance(uri, str)
        and isinstance(pool, str)
        and pool
        and isinstance(domain, str)
        and domain.startswith(prefix)
        and all(isinstance(v, str) and v.startswith(prefix) and "/" not in v for v in names)
    ):
        raise die("the deployment record's libvirt details are not deploy's")
    node_id = domain.removeprefix("fleetbake-")
    seed.check_node_id(node_id)
    if set(names) - set(libvirt_pool.node_volume_names(node_id).values()):
        raise die(f"the deployment record lists volumes that are not node {node_id}'s")
    libvirt_domain.check_uri(uri)
    return {"uri": uri, "pool": pool, "domain": domain, "volumes": names}


def remove_vm(details: dict[str, Any], progress: Say) -> None:
    """Destroy and undefine the node's domain and delete its volumes; what is already
    gone is fine. The environment's base volume stays (other nodes may use it)."""
    checked = checked_details(details)
    with libvirt_domain.connected(checked["uri"]) as conn:
        _remove(conn, checked, checked["pool"], progress)
    kept = details.get("kept_volumes")
    if isinstance(kept, list) and all(isinstance(v, str) for v in kept) and kept:
        progress(f"kept the shared volume {', '.join(kept)} in pool {checked['pool']}")


def console_tail(details: dict[str, Any], lines: int = 15) -> list[str]:
    """The last lines of the node's serial console, read through the libvirt connection
    (for a failed wait: what the guest said)."""
    checked = checked_details(details)
    name = libvirt_pool.node_volume_names(checked["domain"].removeprefix("fleetbake-"))
    with libvirt_domain.connected(checked["uri"]) as conn:
        pool = libvirt_backend.lookup(conn.storagePoolLookupByName, checked["pool"])
        if pool is None or not pool.isActive():
            return []
        data = libvirt_pool.download_tail(pool, name["console"], CONSOLE_TAIL_BYTES)
    return data.decode("utf-8", errors="replace").splitlines()[-lines:]
