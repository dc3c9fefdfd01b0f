"""The hypervisor side of a deployed VM that is not storage: connecting, what the
hypervisor's QEMU runs as, which accelerator it offers, and the domain's life.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from imagefactory.boot.libvirt_backend import URI as LOCAL_URI
from imagefactory.boot.libvirt_backend import LibvirtMachine, load_libvirt, lookup
from imagefactory.deploy.libvirt_pool import Owner
from imagefactory.errors import die
from imagefactory.targets import Target

REMOTE_SCHEME = "qemu+ssh"
_LABEL = re.compile(r"\+(\d+):\+(\d+)\Z")


def check_uri(uri: str) -> str:
    """`qemu:///system` or `qemu+ssh://[user@]host[:port]/system[?params]`."""
    parts = urlsplit(uri)
    local = uri == LOCAL_URI
    remote = parts.scheme == REMOTE_SCHEME and bool(parts.hostname) and parts.path == "/system"
    if not (local or remote):
        raise die(
            f"unsupported libvirt URI {uri!r}",
            hint="qemu:///system or qemu+ssh://[user@]host[:port]/system[?keyfile=...]",
        )
    return uri


def is_local(uri: str) -> bool:
    return uri == LOCAL_URI


def connect(uri: str) -> Any:
    """An open connection to the hypervisor; one line naming it when it is unreachable."""
    libvirt = load_libvirt()
    check_uri(uri)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        reason = (exc.get_error_message() or "unknown error").strip().splitlines()[-1]
        raise die(f"cannot connect to the hypervisor {uri}: {reason}") from None


@contextlib.contextmanager
def connected(uri: str) -> Iterator[Any]:
    """connect(), closed again at the end (over ssh, that ends the ssh process)."""
    conn = connect(uri)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def qemu_owner(conn: Any, domain_type: str) -> Owner:
    """The uid:gid the hypervisor's QEMU runs as (its DAC base label for DOMAIN_TYPE)."""
    caps = ET.fromstring(conn.getCapabilities())
    for model in caps.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            match = _LABEL.match(label.text or "")
            if label.get("type") == domain_type and match:
                return Owner(int(match[1]), int(match[2]))
    raise die("the hypervisor reports no DAC label for its QEMU processes")


def offers_kvm(conn: Any, target: Target) -> bool:
    """The hypervisor's libvirt lists KVM for the target's architecture."""
    caps = ET.fromstring(conn.getCapabilities())
    for guest in caps.iterfind("guest"):
        arch = guest.find("arch")
        if arch is not None and arch.get("name") == target.arch:
            return any(d.get("type") == "kvm" for d in arch.iterfind("domain"))
    raise die(f"the hypervisor cannot run {target.arch} guests (no such QEMU there)")


def pick_accel(conn: Any, uri: str, target: Target, accel: str | None) -> str:
    """`kvm` or `tcg` (ACCEL when given). On this host, KVM must also pass the real probe
    (/dev/kvm can be listed and still not run guests); a remote hypervisor is taken at
    its libvirt's word."""
    if accel is not None:
        if accel not in target.accelerators:
            raise die(f"invalid accelerator {accel!r}", hint=", ".join(target.accelerators))
        return accel
    if "kvm" not in target.accelerators or not offers_kvm(conn, target):
        return "tcg"
    if is_local(uri):
        from imagefactory.host.accel import pick_accelerator

        return pick_accelerator(target)
    return "kvm"


def find_domain(conn: Any, name: str) -> Any | None:
    return lookup(conn.lookupByName, name)


def remove_domain(conn: Any, name: str) -> bool:
    """Destroy and undefine the domain with its NVRAM; False if it was not there."""
    libvirt = load_libvirt()
    if find_domain(conn, name) is None:
        return False
    try:
        LibvirtMachine(conn, name).stop()
    except libvirt.libvirtError as exc:
        if find_domain(conn, name) is not None:  # not just gone in the meantime
            raise die(f"cannot remove domain {name}: {exc.get_error_message()}") from None
    return True


def start_domain(conn: Any, xml: str, name: str) -> Any:
    """Define and start; a domain that fails to start is undefined again."""
    libvirt = load_libvirt()
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as exc:
        raise die(f"the hypervisor refused the domain {name}: {exc.get_error_message()}") from None
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        remove_domain(conn, name)
        raise die(f"the hypervisor could not start {name}: {exc.get_error_message()}") from None
    return dom
