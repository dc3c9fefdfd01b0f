"""How an environment reaches a device, one transport per kind:

    vm         the image from the store (local cache) ─► a storage pool on the device's
               libvirt hypervisor, through the libvirt connection ─► a domain
    container  the container host pulls the pushed image by digest ─► its runtime runs it
    baremetal  install.sh from the store (local cache) ─► SSH ─► the device installs it

`place` starts the node and returns what `remove` needs later (the deployment record's
`details`); `remove` takes it all off again and is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imagefactory.boot.seed import NodeVars
from imagefactory.client import AdminClient
from imagefactory.deploy.baremetal import SshAccess
from imagefactory.deploy.environment import Environment
from imagefactory.errors import die
from imagefactory.reach import LOCAL_CONTAINER_HOST, LOCAL_LIBVIRT
from imagefactory.targets import Target

Say = Callable[[str], None]


@dataclass(frozen=True)
class Placement:
    """Everything a transport gets for one device."""

    device: dict[str, Any]
    """The inventory's record of the device."""
    target: Target
    environment: Environment
    node: NodeVars
    """The node's identity; its master_url is the master as the device's host reaches
    it (the hypervisor, the container host, the bare-metal device itself)."""


class Transport(Protocol):
    def place(self, placement: Placement, say: Say) -> dict[str, Any]: ...

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None: ...

    def last_lines(self, details: dict[str, Any]) -> list[str]:
        """The end of the node's console, for a wait that failed (empty if unknown)."""
        ...

    def local(self, device: dict[str, Any]) -> bool:
        """Whether the device is "the machine deploy runs on" (`qemu:///system`, a
        container host `local`): only that machine can undeploy its node."""
        ...


def from_store(client: AdminClient, digest: str, say: Say) -> Path:
    """The environment's file in the local cache, downloaded (verified) if it is not
    there; pull.py locks the digest's directory, so devices deployed in parallel that
    need the same environment download it once."""
    from imagefactory.deploy.pull import cached

    return cached(client, digest, say)


@dataclass(frozen=True)
class VmTransport:
    client: AdminClient

    def place(self, placement: Placement, say: Say) -> dict[str, Any]:
        from imagefactory.deploy.libvirt_vm import place_vm

        libvirt = placement.device["libvirt"]
        env = placement.environment
        image = from_store(self.client, env.digest, say)
        node = placement.node
        return place_vm(
            libvirt["uri"], libvirt.get("pool") or "default", image, env.digest,
            placement.target, node, node.master_url, say,
        )  # fmt: skip

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None:
        from imagefactory.deploy.libvirt_vm import remove_vm

        remove_vm(deployment["details"], say)

    def last_lines(self, details: dict[str, Any]) -> list[str]:
        from imagefactory.deploy.libvirt_vm import console_tail

        return console_tail(details)

    def local(self, device: dict[str, Any]) -> bool:
        return bool(device["libvirt"] and device["libvirt"]["uri"] == LOCAL_LIBVIRT)


@dataclass(frozen=True)
class ContainerTransport:
    ca_file: Path | None
    """What an https registry is verified against (deploy's --ca-file)."""

    def place(self, placement: Placement, say: Say) -> dict[str, Any]:
        from imagefactory.deploy.container_host import place_container

        host = placement.device["container"]
        reference = placement.environment.reference
        if reference is None:
            raise die(
                f"build {placement.environment.build_id} was not pushed to a registry",
                hint="container devices pull from the registry: serve --registry",
            )
        node = placement.node
        return place_container(
            host["host"], host["runtime"], reference, placement.target, node,
            node.master_url, say, self.ca_file,
        )  # fmt: skip

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None:
        from imagefactory.deploy.container_host import remove_container

        remove_container(deployment["details"], say)

    def last_lines(self, details: dict[str, Any]) -> list[str]:
        workdir = details.get("workdir")  # a container on this host: its console.log
        return tail(Path(workdir) / "console.log") if isinstance(workdir, str) else []

    def local(self, device: dict[str, Any]) -> bool:
        return bool(device["container"] and device["container"]["host"] == LOCAL_CONTAINER_HOST)


@dataclass(frozen=True)
class BaremetalTransport:
    client: AdminClient
    access: SshAccess

    def place(self, placement: Placement, say: Say) -> dict[str, Any]:
        from imagefactory.deploy.baremetal import place_baremetal

        script = from_store(self.client, placement.environment.digest, say)
        return place_baremetal(placement.device["ssh"], self.access, script, placement.node, say)

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None:
        from imagefactory.deploy.baremetal import remove_baremetal

        script = from_store(self.client, deployment["environment"], say)
        remove_baremetal(deployment["details"], self.access, script, say)

    def last_lines(self, details: dict[str, Any]) -> list[str]:
        return []  # the agent's journal is on the device: `journalctl -u executor`

    def local(self, device: dict[str, Any]) -> bool:
        return False


def tail(path: Path, lines: int = 15) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def transports(
    client: AdminClient, access: SshAccess, ca_file: Path | None = None
) -> dict[str, Transport]:
    return {
        "vm": VmTransport(client),
        "container": ContainerTransport(ca_file),
        "baremetal": BaremetalTransport(client, access),
    }
