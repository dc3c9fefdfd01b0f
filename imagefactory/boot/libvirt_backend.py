"""Boot a node under libvirtd (`qemu:///system`): domain XML from the same VmConfig as
the plain QEMU backend, then define -> start -> (wait) -> destroy -> undefine.

Networking: libvirt 9.0's `<interface type='user'>` is either SLIRP without port
forwards, or passt, which has forwards but neither `restrict` nor `guestfwd` (a passt
guest can reach any address the host can). So the NIC is declared through the QEMU
namespace with exactly the `-netdev user,restrict=on,hostfwd=...,guestfwd=...` of the
QEMU backend: one isolation story for both backends.

Ownership: the domain's QEMU runs with the caller's uid:gid (a static DAC label), like
the QEMU backend, so it can read the caller's image and write the caller's files, and
libvirt relabels nothing. (Deploy passes the hypervisor's own QEMU uid:gid instead, and
`pool`: its disks are volumes of a storage pool on the hypervisor, see
imagefactory.deploy.libvirt_vm.)
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from imagefactory.boot import qemu
from imagefactory.errors import HostError, die

URI = "qemu:///system"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
NIC_SLOT = "0x10"
DRIVERS = {
    "disk": {"type": "qcow2", "discard": "unmap"},
    "cdrom": {"type": "raw"},
}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _disk(devices: ET.Element, device: str, path: PurePath, pool: str | None) -> ET.Element:
    """A disk that is a host file, or (with `pool`) the pool volume of that file name."""
    disk = _sub(devices, "disk", type="file" if pool is None else "volume", device=device)
    _sub(disk, "driver", name="qemu", **DRIVERS[device])
    if pool is None:
        _sub(disk, "source", file=str(path))
    else:
        _sub(disk, "source", pool=pool, volume=path.name)
    return disk


def _disks(devices: ET.Element, config: qemu.VmConfig, pool: str | None) -> None:
    disk = _disk(devices, "disk", config.disk, pool)
    _sub(disk, "target", dev="vda", bus="virtio")
    _sub(disk, "boot", order="1")
    _sub(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    cdrom = _disk(devices, "cdrom", config.seed, pool)
    _sub(cdrom, "target", dev="sda", bus="scsi")
    _sub(cdrom, "readonly")


def _os(domain: ET.Element, config: qemu.VmConfig) -> None:
    t = config.target
    os_el = _sub(domain, "os")
    _sub(os_el, "type", "hvm", arch=t.arch, machine=t.machine)
    if config.firmware is not None:
        _sub(os_el, "loader", str(config.firmware.code), readonly="yes", type="pflash")
        _sub(os_el, "nvram", str(config.firmware.vars))
    elif t.firmware == "uefi":
        # No firmware files of ours (a remote hypervisor has its own): libvirt picks the
        # hypervisor's UEFI build from its firmware descriptors and copies the variable
        # template into the domain's NVRAM file, which undefine (with NVRAM) deletes.
        os_el.set("firmware", "efi")
        choice = _sub(os_el, "firmware")
        _sub(choice, "feature", enabled="no", name="secure-boot")


def _cpu(domain: ET.Element, config: qemu.VmConfig) -> list[str]:
    """The <cpu> element; QEMU arguments for CPU properties libvirt cannot express."""
    if config.accel == "kvm":
        _sub(domain, "cpu", mode="host-passthrough")
        return []
    _sub(domain, "cpu", mode="maximum")
    wanted = qemu.cpu_for(config.target, config.accel)
    # e.g. aarch64 `max,pauth-impdef=on`: a later -cpu overrides libvirt's `-cpu max`.
    return [] if wanted == "max" else ["-cpu", wanted]


def domain_xml(
    config: qemu.VmConfig, uid: int | None = None, gid: int | None = None, pool: str | None = None
) -> str:
    """The libvirt domain definition of one node. `pool`: the disk and seed are volumes of
    that storage pool (named like the file names of config.disk and config.seed) instead
    of files; config.console_log is then a path on the hypervisor."""
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.Element("domain", type="kvm" if config.accel == "kvm" else "qemu")
    _sub(domain, "name", config.name)
    _sub(domain, "memory", str(config.memory_mib), unit="MiB")
    _sub(domain, "vcpu", str(config.cpus))
    _os(domain, config)
    features = _sub(domain, "features")
    _sub(features, "acpi")
    extra_args = _cpu(domain, config)
    # Like QEMU's -no-reboot: a node runs once, any shutdown or reboot ends it.
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(domain, event, "destroy")
    devices = _sub(domain, "devices")
    _disks(devices, config, pool)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(config.console_log))
    _sub(serial, "target", port="0")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")
    _sub(devices, "memballoon", model="none")
    label = _sub(domain, "seclabel", type="static", model="dac", relabel="no")
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    _sub(label, "label", f"+{uid}:+{gid}")
    commandline = _sub(domain, f"{{{QEMU_NS}}}commandline")
    args = [
        "-netdev",
        qemu.netdev_arg(config),
        # A fixed slot on the root bus, clear of the slots libvirt hands out from 0x1.
        "-device",
        f"virtio-net-pci,netdev=net0,bus=pcie.0,addr={NIC_SLOT}",
    ]
    for arg in [*args, *extra_args, *config.target.extra_qemu_args]:
        _sub(commandline, f"{{{QEMU_NS}}}arg", value=arg)
    # libvirt's seccomp sandbox has spawn=deny, which stops QEMU from starting the
    # guestfwd relay. (Even without spawn=deny, guests' connections to the master were
    # closed unanswered: the relay inherits the filter.) No sandbox, like the QEMU backend.
    capabilities = _sub(domain, f"{{{QEMU_NS}}}capabilities")
    _sub(capabilities, f"{{{QEMU_NS}}}del", capability="seccomp-sandbox")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def load_libvirt() -> Any:
    try:
        import libvirt
    except ImportError as exc:
        raise die(f"libvirt-python is not importable: {exc}", hint="run make setup") from None
    # Without this, libvirt prints every error to stderr on top of raising it.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def lookup(find: Callable[[str], Any], name: str) -> Any | None:
    """find(name) (a domain, pool or volume by name), or None when libvirt has none. Any
    other failure (a lost connection, a refused permission) is an error: read as "none", it
    made a running VM look stopped, and would make an existing pool look missing."""
    libvirt = load_libvirt()
    try:
        return find(name)
    except libvirt.libvirtError as exc:
        missing = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_NO_STORAGE_POOL,
                   libvirt.VIR_ERR_NO_STORAGE_VOL)  # fmt: skip
        _pass_over(exc, f"look up {name!r}", *missing)
        return None


def ssh_forward_port(dom: Any) -> int | None:
    """The port the domain's QEMU picked for the guest's SSH on its host's 127.0.0.1 (the
    rule asks for port 0: a port picked before QEMU binds it could be taken meanwhile);
    None if it has no such forward. A monitor command that fails is an error."""
    import libvirt_qemu

    libvirt = load_libvirt()
    try:
        text = libvirt_qemu.qemuMonitorCommand(
            dom, "info usernet", libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        )
    except libvirt.libvirtError as exc:
        raise HostError(f"libvirt: cannot ask {dom.name()} for its SSH port: {exc}") from None
    return qemu.forwarded_ssh_port(text)


def open_connection() -> Any:
    libvirt = load_libvirt()
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as exc:
        raise die(
            f"cannot connect to libvirtd at {URI}: {exc.get_error_message()}",
            hint="start it with scripts/setup-host.sh (or `libvirtd -d`)",
        ) from None


class LibvirtMachine:
    """A started libvirt domain; stop() destroys and undefines it (idempotent)."""

    def __init__(self, conn: Any, name: str) -> None:
        self.conn = conn
        self.name = name

    def _domain(self) -> Any | None:
        return lookup(self.conn.lookupByName, self.name)

    def running(self) -> bool:
        dom = self._domain()
        return bool(dom is not None and dom.isActive())

    def ssh_port(self) -> int:
        """The host port the domain's QEMU bound for the guest's SSH."""
        dom = self._domain()
        if dom is None:
            raise HostError(f"libvirt: the domain {self.name} is gone")
        port = ssh_forward_port(dom)
        if port is None:
            raise HostError(f"libvirt: the domain {self.name} reports no SSH forward")
        return port

    def stop(self) -> None:
        """Destroy and undefine the domain. Only "not running" and "no such domain" mean
        it ended by itself meanwhile; any other failure is an error: undefining a domain
        that still runs would make it transient and leave it running unseen."""
        libvirt = load_libvirt()
        dom = self._domain()
        if dom is None:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as exc:
            gone = (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)  # not running
            _pass_over(exc, f"stop domain {self.name}", *gone)
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        except libvirt.libvirtError as exc:
            _pass_over(exc, f"undefine domain {self.name}", libvirt.VIR_ERR_NO_DOMAIN)


def _pass_over(exc: Any, doing: str, *expected: int) -> None:
    """Pass over a libvirt error whose code is one of `expected` (the thing is missing or
    already stopped); any other error is one line."""
    if exc.get_error_code() not in expected:
        raise HostError(f"libvirt: cannot {doing}: {exc}") from None


def start(config: qemu.VmConfig) -> LibvirtMachine:
    """Define and start the domain; on a failed start it is undefined again."""
    libvirt = load_libvirt()
    conn = open_connection()
    machine = LibvirtMachine(conn, config.name)
    machine.stop()  # a leftover domain of the same node from an interrupted run
    try:
        dom = conn.defineXML(domain_xml(config))
    except libvirt.libvirtError as exc:
        message = exc.get_error_message()
        raise die(f"libvirt refused the domain of {config.name}: {message}") from None
    try:
        dom.create()
    except libvirt.libvirtError as exc:
        machine.stop()
        raise die(f"libvirt could not start {config.name}: {exc.get_error_message()}") from None
    return machine
