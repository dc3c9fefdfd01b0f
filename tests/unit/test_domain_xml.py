"""The libvirt domain XML: same disks, network rules and console as the QEMU backend."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from imagefactory.boot import libvirt_backend, qemu
from imagefactory.targets import get_target

Q = {"qemu": libvirt_backend.QEMU_NS}


def config(target: str = "x86_64-linux", accel: str = "tcg", **extra: object) -> qemu.VmConfig:
    return qemu.VmConfig(
        name="fleetbake-n-1",
        target=get_target(target),
        accel=accel,
        disk=Path("/s/n-1/overlay.qcow2"),
        seed=Path("/s/n-1/seed.iso"),
        console_log=Path("/s/n-1/console.log"),
        ssh_port=2201,
        master=qemu.master_forward("http://127.0.0.1:8080"),
        **extra,  # type: ignore[arg-type]
    )


def parse(c: qemu.VmConfig) -> ET.Element:
    return ET.fromstring(libvirt_backend.domain_xml(c, uid=1000, gid=1001))


def qemu_args(root: ET.Element) -> list[str]:
    return [a.attrib["value"] for a in root.findall("qemu:commandline/qemu:arg", Q)]


def test_x86_64_domain() -> None:
    root = parse(config())
    assert root.attrib["type"] == "qemu"  # TCG
    assert root.findtext("name") == "fleetbake-n-1"
    assert root.find("memory").attrib == {"unit": "MiB"}  # type: ignore[union-attr]
    assert root.findtext("memory") == "1024" and root.findtext("vcpu") == "2"
    os_type = root.find("os/type")
    assert os_type is not None and os_type.attrib == {"arch": "x86_64", "machine": "q35"}
    assert root.find("os/loader") is None
    assert root.find("cpu").attrib == {"mode": "maximum"}  # type: ignore[union-attr]
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        assert root.findtext(event) == "destroy"
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("source").attrib == {"file": "/s/n-1/overlay.qcow2"}  # type: ignore[union-attr]
    assert disk.find("driver").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert cdrom.attrib["device"] == "cdrom" and cdrom.find("readonly") is not None
    assert cdrom.find("source").attrib == {"file": "/s/n-1/seed.iso"}  # type: ignore[union-attr]
    serial = root.find("devices/serial")
    assert serial is not None and serial.attrib == {"type": "file"}
    assert serial.find("source").attrib == {"path": "/s/n-1/console.log"}  # type: ignore[union-attr]
    label = root.find("seclabel")
    assert label is not None and label.attrib["model"] == "dac"
    assert root.findtext("seclabel/label") == "+1000:+1001"
    # No libvirt-managed NIC: the isolated user network comes from the QEMU namespace.
    assert root.find("devices/interface") is None


def test_network_and_sandbox_are_the_qemu_backends() -> None:
    c = config()
    root = parse(c)
    assert qemu_args(root) == [
        "-netdev",
        qemu.netdev_arg(c),
        "-device",
        "virtio-net-pci,netdev=net0,bus=pcie.0,addr=0x10",
    ]
    assert "restrict=on" in qemu.netdev_arg(c)
    # libvirt's own sandbox (spawn=deny) would stop QEMU from starting the relay.
    dropped = root.find("qemu:capabilities/qemu:del", Q)
    assert dropped is not None and dropped.attrib == {"capability": "seccomp-sandbox"}


def test_kvm_passes_the_host_cpu_through() -> None:
    root = parse(config(accel="kvm"))
    assert root.attrib["type"] == "kvm"
    assert root.find("cpu").attrib == {"mode": "host-passthrough"}  # type: ignore[union-attr]


def test_aarch64_uefi_and_cpu_properties() -> None:
    fw = qemu.PflashPair(code=Path("/fw/CODE.fd"), vars=Path("/s/n-1/vars.fd"))
    root = parse(config("aarch64-linux", firmware=fw))
    loader = root.find("os/loader")
    assert loader is not None and loader.text == "/fw/CODE.fd"
    assert loader.attrib == {"readonly": "yes", "type": "pflash"}
    assert root.findtext("os/nvram") == "/s/n-1/vars.fd"
    args = qemu_args(root)
    assert args[4:] == ["-cpu", "max,pauth-impdef=on", "-boot", "strict=off"]
