"""How an environment reaches a device, one transport per kind:

    vm         the image from the store (local cache) ─► a storage pool on the device's
               libvirt hypervisor, through the libvirt connection ─► a domain
    container  the container host pulls the pushed image by digest ─► its runtime runs it
    baremetal  install.sh from the store (local cache) ─► SSH ─► the device installs it

`place` starts the node and returns what `remove` needs later (the deployment record's
`details`); `remove` takes it all off again and is idempotent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from imagefactory.boot.seed import NodeVars
from imagefactory.client import AdminClient
from imagefactory.deploy.baremetal import SshAccess
from imagefactory.deploy.environment import Environment
from imagefactory.errors import die
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


@dataclass
class StoreCache:
    """Environments downloaded from the store into the local cache, one download per
    digest at a time (devices deployed in parallel may need the same one)."""

    client: AdminClient
    _locks: dict[str, threading.Lock] = field(default_factory=dict)
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def file(self, digest: str, say: Say) -> Path:
        from imagefactory.deploy.pull import cached

        with self._guard:
            lock = self._locks.setdefault(digest, threading.Lock())
        with lock:
            return cached(self.client, digest, say)


@dataclass(frozen=True)
class VmTransport:
    store: StoreCache

    def place(self, placement: Placement, say: Say) -> dict[str, Any]:
        from imagefactory.deploy.libvirt_vm import place_vm

        libvirt = placement.device["libvirt"]
        env = placement.environment
        image = self.store.file(env.digest, say)
        node = placement.node
        return place_vm(
            libvirt["uri"], libvirt.get("pool") or "default", image, env.digest,
            placement.target, node, node.master_url, say,
        )  # fmt: skip

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None:
        from imagefactory.deploy.libvirt_vm import remove_vm

        remove_vm(deployment["details"], say)


@dataclass(frozen=True)
class ContainerTransport:
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
            node.master_url, say,
        )  # fmt: skip

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None:
        from imagefactory.deploy.container_host import remove_container

        remove_container(deployment["details"], say)


@dataclass(frozen=True)
class BaremetalTransport:
    store: StoreCache
    access: SshAccess

    def place(self, placement: Placement, say: Say) -> dict[str, Any]:
        from imagefactory.deploy.baremetal import place_baremetal

        script = self.store.file(placement.environment.digest, say)
        return place_baremetal(placement.device["ssh"], self.access, script, placement.node, say)

    def remove(self, device: dict[str, Any], deployment: dict[str, Any], say: Say) -> None:
        from imagefactory.deploy.baremetal import remove_baremetal

        script = self.store.file(deployment["environment"], say)
        remove_baremetal(device["ssh"], self.access, script, say)


def transports(client: AdminClient, access: SshAccess) -> dict[str, Transport]:
    store = StoreCache(client)
    return {
        "vm": VmTransport(store),
        "container": ContainerTransport(),
        "baremetal": BaremetalTransport(store, access),
    }
