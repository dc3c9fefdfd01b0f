"""Deploy's libvirt VM: the domain XML (pool volumes, console, relay, UEFI), the master as
a hypervisor reaches it, volume names, the details undeploy trusts, URIs, and the sparse
reader that feeds virStream.sparseSendAll."""

from __future__ import annotations

import os
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest

from imagefactory.boot import libvirt_backend, qemu, seed
from imagefactory.deploy import libvirt_domain, libvirt_pool, libvirt_vm
from imagefactory.targets import get_target

Q = {"qemu": libvirt_backend.QEMU_NS}
POOL_DIR = PurePosixPath("/var/lib/libvirt/images")
DIGEST = "sha256:" + "0123456789abcdef" * 4


def deploy_config(target: str = "x86_64-linux", master: str = "http://127.0.0.1:8750") -> Any:
    names = libvirt_pool.node_volume_names("edge-1-3f9c2a")
    return qemu.VmConfig(
        name="fleetbake-edge-1-3f9c2a",
        target=get_target(target),
        accel="tcg",
        disk=Path(POOL_DIR / names["disk"]),
        seed=Path(POOL_DIR / names["seed"]),
        console_log=Path(POOL_DIR / names["console"]),
        ssh_port=0,
        master=qemu.master_forward(master, relay="socat", loopback_only=False),
    )


def parse(config: qemu.VmConfig) -> ET.Element:
    return ET.fromstring(libvirt_backend.domain_xml(config, 64055, 64056, pool="fleet"))


def guestfwd_command(root: ET.Element) -> list[str]:
    args = [a.attrib["value"] for a in root.findall("qemu:commandline/qemu:arg", Q)]
    rules = args[args.index("-netdev") + 1].split(",")
    (rule,) = [r for r in rules if r.startswith("guestfwd=")]
    return shlex.split(rule.split("-cmd:", 1)[1])


def test_disks_are_pool_volumes_not_files() -> None:
    root = parse(deploy_config())
    disk, cdrom = root.findall("devices/disk")
    assert disk.attrib == {"type": "volume", "device": "disk"}
    assert disk.find("source").attrib == {  # type: ignore[union-attr]
        "pool": "fleet",
        "volume": "fleetbake-edge-1-3f9c2a.qcow2",
    }
    assert disk.find("driver").attrib["type"] == "qcow2"  # type: ignore[union-attr]
    assert cdrom.attrib == {"type": "volume", "device": "cdrom"}
    assert cdrom.find("source").attrib == {  # type: ignore[union-attr]
        "pool": "fleet",
        "volume": "fleetbake-edge-1-3f9c2a-seed.iso",
    }
    assert cdrom.find("driver").attrib["type"] == "raw"  # type: ignore[union-attr]
    assert cdrom.find("readonly") is not None
    assert "file" not in ET.tostring(disk, encoding="unicode")


def test_console_beside_the_volumes_and_qemu_as_the_hypervisors_user() -> None:
    root = parse(deploy_config())
    serial = root.find("devices/serial")
    assert serial is not None and serial.attrib == {"type": "file"}
    path = serial.find("source").attrib["path"]  # type: ignore[union-attr]
    assert path == "/var/lib/libvirt/images/fleetbake-edge-1-3f9c2a-console.log"
    assert root.findtext("seclabel/label") == "+64055:+64056"
    assert root.find("seclabel").attrib["relabel"] == "no"  # type: ignore[union-attr]


def test_boot_keeps_file_disks_and_its_own_relay() -> None:
    config = deploy_config()
    boot_config = qemu.VmConfig(
        **{**config.__dict__, "master": qemu.master_forward("http://127.0.0.1:8750")}
    )
    root = ET.fromstring(libvirt_backend.domain_xml(boot_config, 0, 0))
    disk = root.find("devices/disk")
    assert disk is not None and disk.attrib["type"] == "file"
    assert guestfwd_command(root)[1:3] == ["-m", "imagefactory.boot.relay"]


def test_the_relay_on_a_hypervisor_is_socat_with_ssh_on_its_loopback_only() -> None:
    root = parse(deploy_config(master="https://master.example.net:8750"))
    assert guestfwd_command(root) == [
        "socat", "-t", str(qemu.SOCAT_LINGER_S), "STDIO", "TCP:master.example.net:8750",
    ]  # fmt: skip
    args = [a.attrib["value"] for a in root.findall("qemu:commandline/qemu:arg", Q)]
    netdev = args[args.index("-netdev") + 1].split(",")
    assert "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:0-:22" in netdev  # QEMU picks the port, loopback only
    assert "guestfwd=tcp:10.0.2.100:8750-cmd:" in ",".join(netdev)


def test_socat_address_of_an_ipv6_master() -> None:
    forward = qemu.master_forward("http://[::1]:8750", relay="socat")
    assert shlex.split(qemu.relay_command(forward))[-1] == "TCP6:[::1]:8750"


def test_aarch64_uefi_comes_from_the_hypervisors_firmware() -> None:
    root = parse(deploy_config("aarch64-linux"))
    os_el = root.find("os")
    assert os_el is not None and os_el.attrib == {"firmware": "efi"}
    assert os_el.find("loader") is None and os_el.find("nvram") is None
    feature = os_el.find("firmware/feature")
    assert feature is not None and feature.attrib == {"enabled": "no", "name": "secure-boot"}
    assert root.find("os/type").attrib["machine"] == "virt"  # type: ignore[union-attr]


def test_x86_64_has_no_firmware_element() -> None:
    root = parse(deploy_config())
    assert root.find("os").attrib == {}  # type: ignore[union-attr]
    assert root.find("os/firmware") is None


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://bad host:80", "invalid host"),
        ("http://a_b:80", "invalid host"),
        ("http://-x:80", "invalid host"),
        ("ftp://master:21", "invalid master URL"),
    ],
)
def test_a_hypervisor_master_must_be_a_plain_host(url: str, message: str) -> None:
    with pytest.raises(click.ClickException, match=message):
        qemu.master_forward(url, relay="socat", loopback_only=False)


def test_boot_still_refuses_a_master_beyond_loopback() -> None:
    with pytest.raises(click.ClickException, match="not on this host's loopback"):
        qemu.master_forward("http://192.0.2.7:8750")
    with pytest.raises(ValueError, match="relay"):
        qemu.master_forward("http://127.0.0.1:8750", relay="nc")


def node(**extra: Any) -> seed.NodeVars:
    return seed.NodeVars(node_id="edge-1-3f9c2a", token="t", on_complete="none", **extra)


def test_guest_url_and_insecure_only_on_the_hypervisors_loopback() -> None:
    guest, forward = libvirt_vm.guest_node(node(), "http://127.0.0.1:8750")
    assert guest.master_url == "http://10.0.2.100:8750" and guest.insecure
    assert forward is not None and forward.relay == "socat"
    guest, _ = libvirt_vm.guest_node(node(), "https://master.example.net:8750/")
    assert guest.master_url == "https://10.0.2.100:8750/" and not guest.insecure
    with pytest.raises(click.ClickException, match="not on the hypervisor's loopback"):
        libvirt_vm.guest_node(node(), "http://192.0.2.7:8750")
    guest, _ = libvirt_vm.guest_node(node(insecure=True), "http://192.0.2.7:8750")
    assert guest.insecure  # the caller chose it
    guest, forward = libvirt_vm.guest_node(node(master_url="http://x:1"), None)
    assert guest.master_url is None and forward is None


def test_volume_names() -> None:
    assert libvirt_pool.base_volume_name(DIGEST) == "fleetbake-0123456789abcdef.qcow2"
    assert libvirt_pool.node_volume_names("n-1") == {
        "disk": "fleetbake-n-1.qcow2",
        "seed": "fleetbake-n-1-seed.iso",
        "console": "fleetbake-n-1-console.log",
    }


@pytest.mark.parametrize(
    "digest", ["", "sha256:abc", "sha512:" + "0" * 64, "sha256:" + "A" * 64, "../" + "0" * 64]
)
def test_bad_digests_are_refused(digest: str) -> None:
    with pytest.raises(click.ClickException, match="invalid environment digest"):
        libvirt_pool.base_volume_name(digest)


GOOD = {
    "uri": "qemu+ssh://root@hv1/system",
    "pool": "default",
    "domain": "fleetbake-edge-1-3f9c2a",
    "volumes": [
        "fleetbake-edge-1-3f9c2a.qcow2",
        "fleetbake-edge-1-3f9c2a-seed.iso",
        "fleetbake-edge-1-3f9c2a-console.log",
    ],
    "kept_volumes": ["fleetbake-0123456789abcdef.qcow2"],
}


def test_details_from_place_are_accepted() -> None:
    assert libvirt_vm.checked_details(GOOD) == {k: GOOD[k] for k in list(GOOD)[:4]}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"domain": "production-db"}, "not deploy's"),
        ({"volumes": ["fleetbake-0123456789abcdef.qcow2"]}, "not node edge-1-3f9c2a's"),
        ({"volumes": ["fleetbake-other.qcow2"]}, "not node edge-1-3f9c2a's"),
        ({"volumes": ["fleetbake-x/../../etc/passwd"]}, "not deploy's"),
        ({"volumes": "fleetbake-edge-1-3f9c2a.qcow2"}, "not deploy's"),
        ({"volumes": [7]}, "not deploy's"),
        ({"uri": "qemu+tcp://hv1/system"}, "unsupported libvirt URI"),
        ({"pool": ""}, "not deploy's"),
        ({"domain": "fleetbake-a b"}, "invalid node ID"),
    ],
)
def test_hostile_details_are_refused(change: dict[str, Any], message: str) -> None:
    with pytest.raises(click.ClickException, match=message):
        libvirt_vm.checked_details({**GOOD, **change})


def test_details_without_libvirt_keys_are_refused() -> None:
    with pytest.raises(click.ClickException, match="no libvirt details"):
        libvirt_vm.checked_details({"host": "local"})


@pytest.mark.parametrize(
    "uri",
    [
        "qemu:///system",
        "qemu+ssh://hv1/system",
        "qemu+ssh://root@hv1:2222/system?keyfile=/k&no_tty=1",
    ],
)
def test_supported_uris(uri: str) -> None:
    assert libvirt_domain.check_uri(uri) == uri


@pytest.mark.parametrize(
    "uri",
    ["qemu:///session", "qemu+tcp://hv1/system", "qemu+ssh:///system", "test:///default", "x"],
)
def test_unsupported_uris(uri: str) -> None:
    with pytest.raises(click.ClickException, match="unsupported libvirt URI"):
        libvirt_domain.check_uri(uri)


class FakeConn:
    def __init__(self, caps: str) -> None:
        self.caps = caps

    def getCapabilities(self) -> str:  # noqa: N802 (libvirt's name)
        return self.caps


CAPS = """<capabilities><host><secmodel><model>none</model></secmodel>
<secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+107</baselabel>
<baselabel type='qemu'>+64055:+64055</baselabel></secmodel></host>
<guest><os_type>hvm</os_type><arch name='x86_64'><domain type='qemu'/>{kvm}</arch></guest>
</capabilities>"""


def test_the_hypervisors_qemu_user_and_kvm_come_from_its_capabilities() -> None:
    conn = FakeConn(CAPS.format(kvm="<domain type='kvm'/>"))
    assert libvirt_domain.qemu_owner(conn, "kvm") == libvirt_pool.Owner(64055, 107)
    assert libvirt_domain.qemu_owner(conn, "qemu") == libvirt_pool.Owner(64055, 64055)
    target = get_target("x86_64-linux")
    assert libvirt_domain.offers_kvm(conn, target)
    remote = "qemu+ssh://hv1/system"
    assert libvirt_domain.pick_accel(conn, remote, target, None) == "kvm"
    assert libvirt_domain.pick_accel(conn, remote, target, "tcg") == "tcg"
    no_kvm = FakeConn(CAPS.format(kvm=""))
    assert libvirt_domain.pick_accel(no_kvm, remote, target, None) == "tcg"
    with pytest.raises(click.ClickException, match="invalid accelerator"):
        libvirt_domain.pick_accel(conn, remote, target, "hvf")
    with pytest.raises(click.ClickException, match="cannot run aarch64 guests"):
        libvirt_domain.offers_kvm(conn, get_target("aarch64-linux"))
    with pytest.raises(click.ClickException, match="no DAC label"):
        libvirt_domain.qemu_owner(FakeConn("<capabilities><host/></capabilities>"), "qemu")


class RecordingStream:
    """Just enough of virStream for sparseSendAll: what was sent, holes as zeros."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.holes: list[int] = []

    def send(self, data: bytes) -> int:
        self.out += data
        return len(data)

    def sendHole(self, length: int) -> int:  # noqa: N802 (libvirt's name)
        self.holes.append(length)
        self.out += bytes(length)
        return 0


def sparse_file(path: Path) -> bytes:
    """4 MiB: data, a 1 MiB hole, data, and a hole up to the end."""
    with path.open("wb") as f:
        f.write(b"a" * 65536)
        f.seek(65536 + (1 << 20))
        f.write(b"b" * 4096)
        f.truncate(4 << 20)
    return path.read_bytes()


def send_range(path: Path, start: int, end: int) -> tuple[RecordingStream, int]:
    """What sparseSendAll sends of bytes START..END; (stream, data bytes read)."""
    import libvirt

    stream = RecordingStream()
    fd = os.open(path, os.O_RDONLY)
    try:
        reader = libvirt_pool._SparseReader(fd, start, end, "v", lambda _: None)
        libvirt.virStream.sparseSendAll(stream, reader.read, reader.section, reader.skip, None)
    finally:
        os.close(fd)
    return stream, reader.sent


def test_the_sparse_reader_sends_data_and_describes_holes(tmp_path: Path) -> None:
    path = tmp_path / "image"
    content = sparse_file(path)
    stream, sent = send_range(path, 0, len(content))
    assert bytes(stream.out) == content
    if not stream.holes:
        pytest.skip("this file system reports no holes (SEEK_HOLE)")
    assert sent < 128 * 1024  # the 4 MiB file's data only
    assert sum(stream.holes) == len(content) - sent


@pytest.mark.parametrize(
    ("start", "end"), [(65536, 4 << 20), (0, 65536), (1000, 70000), (65536 + 100, 1 << 20)]
)
def test_the_sparse_reader_sends_exactly_a_range(tmp_path: Path, start: int, end: int) -> None:
    """The body first, the header last: each part is exactly its bytes, in data or holes."""
    path = tmp_path / "image"
    content = sparse_file(path)
    stream, _ = send_range(path, start, end)
    assert bytes(stream.out) == content[start:end]


class BusyPool:
    """A pool whose libvirtd is building a volume for the first `busy` refreshes."""

    def __init__(self, busy: int) -> None:
        self.busy, self.calls = busy, 0

    def name(self) -> str:
        return "fleet"

    def refresh(self, _flags: int) -> int:
        import libvirt

        self.calls += 1
        if self.calls <= self.busy:
            raise libvirt.libvirtError("pool 'fleet' has asynchronous jobs running.")
        return 0


def test_refresh_waits_for_a_busy_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("imagefactory.deploy.libvirt_pool.time.sleep", lambda _s: None)
    pool = BusyPool(busy=3)
    libvirt_pool.refresh(pool)
    assert pool.calls == 4
    monkeypatch.setattr(libvirt_pool, "REFRESH_WAIT_S", 0.0)
    with pytest.raises(click.ClickException, match="cannot refresh storage pool 'fleet'"):
        libvirt_pool.refresh(BusyPool(busy=10**6))


def test_lookup_is_none_only_for_what_libvirt_does_not_have() -> None:
    """libvirt's own test driver (in process, no daemon): a missing domain, pool or volume
    is None; a lost connection is an error, not a stopped VM."""
    libvirt = libvirt_backend.load_libvirt()
    conn = libvirt.open("test:///default")
    pool = conn.storagePoolLookupByName("default-pool")
    assert libvirt_backend.lookup(conn.lookupByName, "nope") is None
    assert libvirt_backend.lookup(conn.storagePoolLookupByName, "nope") is None
    assert libvirt_backend.lookup(pool.storageVolLookupByName, "nope") is None
    machine = libvirt_backend.LibvirtMachine(conn, "test")  # the driver's running domain
    assert machine.running()
    conn.close()
    with pytest.raises(click.ClickException, match="libvirt: cannot look up 'test': invalid"):
        machine.running()


class StuckDomain:
    """A domain whose QEMU cannot be killed (stuck in the kernel)."""

    undefined = False

    def isActive(self) -> bool:  # noqa: N802 (libvirt's name)
        return True

    def destroy(self) -> None:
        import libvirt

        libvirt.virResetLastError()  # the error is this message, not an earlier test's
        raise libvirt.libvirtError("Failed to terminate process 4242 with SIGKILL: busy")

    def undefineFlags(self, _flags: int) -> None:  # noqa: N802 (libvirt's name)
        self.undefined = True


def test_a_domain_that_cannot_be_stopped_is_an_error_and_stays_defined() -> None:
    domain = StuckDomain()
    conn = type("Conn", (), {"lookupByName": lambda _self, _name: domain})()
    machine = libvirt_backend.LibvirtMachine(conn, "fleetbake-n1")
    with pytest.raises(click.ClickException, match="cannot stop domain fleetbake-n1: .*busy"):
        machine.stop()
    assert not domain.undefined, "a running domain undefined becomes transient and runs on"


def test_a_failing_monitor_command_is_an_error_with_libvirts_reason() -> None:
    """libvirt's test driver has no QEMU monitor: its refusal is the message."""
    import libvirt

    conn = libvirt.open("test:///default")
    try:
        machine = libvirt_backend.LibvirtMachine(conn, "test")
        with pytest.raises(click.ClickException, match="cannot ask test for its SSH port: .+"):
            machine.ssh_port()
    finally:
        conn.close()
