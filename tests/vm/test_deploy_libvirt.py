"""A VM deployed onto a REMOTE libvirt hypervisor through `qemu+ssh://`.

The test runs its own sshd on a loopback port (throwaway host key, a client key
authorized for root through its own AuthorizedKeysFile; the system's sshd is not
touched), and reaches the libvirtd behind it as a remote hypervisor: the image must
travel through the libvirt connection into a storage pool, the domain's disks must be
volumes of that pool, and the node must heartbeat and report to a real
`imagefactory serve` on loopback. Then remove_vm must leave nothing of the node.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from imagefactory.bake.cache import sha256_file
from imagefactory.boot import seed
from imagefactory.boot.waiting import MasterApi
from imagefactory.deploy import libvirt_domain, libvirt_pool
from imagefactory.deploy.libvirt_vm import console_tail, image_info, place_vm, remove_vm
from imagefactory.targets import get_target
from tests.baking import BakedImage
from tests.integration.services_harness import ServerProcess

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

SSHD = "/usr/sbin/sshd"
WAIT_S = 1800.0  # TCG on a loaded 2-core machine: a boot takes minutes, not seconds


@dataclass(frozen=True)
class Hypervisor:
    uri: str
    port: int


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleetbake-test", "-f", str(path)],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"sshd exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("sshd did not listen")


@pytest.fixture(scope="module")
def hypervisor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypervisor]:
    """This machine's libvirtd, reached as a remote hypervisor over the test's own sshd."""
    tmp = tmp_path_factory.mktemp("sshd")
    host_pub = _keygen(tmp / "host_ed25519")
    client_pub = _keygen(tmp / "client_ed25519")
    (tmp / "authorized_keys").write_text(client_pub + "\n")
    port = _free_port()
    config = tmp / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {tmp / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nPidFile {tmp / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    # The host key is checked against the test's own known_hosts: libvirt's ssh
    # transport runs the `command=` binary, here ssh with that file and strict checking.
    known_hosts = tmp / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    wrapper = tmp / "ssh"
    wrapper.write_text(
        "#!/bin/sh\nexec ssh -o StrictHostKeyChecking=yes -o GlobalKnownHostsFile=/dev/null "
        f'-o UserKnownHostsFile={known_hosts} "$@"\n'
    )
    wrapper.chmod(0o700)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    with (tmp / "sshd.log").open("wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=log)
    try:
        _wait_listening(port, proc)
        uri = (
            f"qemu+ssh://root@127.0.0.1:{port}/system"
            f"?keyfile={tmp / 'client_ed25519'}&no_tty=1&command={wrapper}"
        )
        yield Hypervisor(uri, port)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def remote_pool(hypervisor: Hypervisor) -> Iterator[tuple[Any, Path]]:
    """A throwaway dir pool, made over the remote connection; destroyed with its volumes."""
    # Under /var/tmp and 0711: the hypervisor's QEMU user must reach the volumes.
    directory = Path(tempfile.mkdtemp(prefix="fleetbake-pool-", dir="/var/tmp"))
    directory.chmod(0o711)
    conn = libvirt_domain.connect(hypervisor.uri)
    name = f"fleetbake-test-{uuid.uuid4().hex[:8]}"
    xml = f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>"
    pool = conn.storagePoolCreateXML(xml, 0)
    try:
        yield pool, directory
    finally:
        pool.refresh(0)
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        conn.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("master")).start()
    try:
        yield server
    finally:
        server.stop()


def _wait(condition: Any, what: str, details: dict[str, Any]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < WAIT_S:
        if condition():
            return time.monotonic() - started
        time.sleep(2)
    tail = "\n".join(console_tail(details, 30))
    pytest.fail(f"no {what} after {WAIT_S:.0f} s; last console lines:\n{tail}")


def test_vm_placed_through_qemu_ssh_reports_and_is_removed(
    hypervisor: Hypervisor,
    remote_pool: tuple[Any, Path],
    master: ServerProcess,
    baked_image: BakedImage,
) -> None:
    pool, directory = remote_pool
    image = baked_image.image
    digest = "sha256:" + sha256_file(image)
    node_id = f"hv-1-{uuid.uuid4().hex[:6]}"
    node = seed.NodeVars(
        node_id=node_id,
        run_id=str(uuid.uuid4()),
        token=master.node_token(node_id),
        on_complete="none",
    )
    lines: list[str] = []
    started = time.monotonic()
    # This machine lists KVM but cannot run guests with it, and a remote hypervisor is
    # taken at its libvirt's word: say TCG, as a device record on such a host would.
    details = place_vm(
        hypervisor.uri, pool.name(), image, digest, get_target("x86_64-linux"), node,
        master.url, lines.append, accel="tcg",
    )  # fmt: skip
    try:
        print("\n".join(lines))
        print(f"placed (upload, volumes, domain started) in {time.monotonic() - started:.1f} s")
        assert details["uri"] == hypervisor.uri and details["pool"] == pool.name()
        assert any("uploaded" in line for line in lines), lines

        # The image is a volume of the remote pool, listed over the connection, byte for
        # byte the environment (the file in the pool's directory is checked too: the
        # hypervisor is this machine).
        conn = libvirt_domain.connect(hypervisor.uri)
        pool_there = conn.storagePoolLookupByName(pool.name())
        pool_there.refresh(0)
        base_name = libvirt_pool.base_volume_name(digest)
        assert details["kept_volumes"] == [base_name]
        names = {v.name() for v in pool_there.listAllVolumes(0)}
        assert {base_name, *details["volumes"][:2]} <= names, names
        base = pool_there.storageVolLookupByName(base_name)
        assert Path(base.path()).parent == directory
        assert base.info()[1] == image_info(image).virtual_size
        assert sha256_file(Path(base.path())) == digest.removeprefix("sha256:")
        # Sparse: the pool's copy allocates no more than the image does.
        assert os.stat(base.path()).st_blocks <= os.stat(image).st_blocks + 2048

        # The domain's disks are pool volumes, never the test's local files.
        dom = conn.lookupByName(details["domain"])
        assert dom.isActive()
        root = ET.fromstring(dom.XMLDesc(0))
        sources = [d.find("source") for d in root.iterfind("devices/disk")]
        assert [s.attrib["pool"] for s in sources if s is not None] == [pool.name()] * 2
        disk_xml = ET.tostring(root.find("devices"), encoding="unicode")  # type: ignore[arg-type]
        assert str(image) not in disk_xml and str(image.parent) not in disk_xml
        backing = root.find("devices/disk/backingStore/source")
        assert backing is not None and backing.attrib["file"] == base.path()
        # QEMU runs as the hypervisor's QEMU user; SSH only on its loopback.
        owner = libvirt_domain.qemu_owner(conn, "qemu")
        assert root.findtext("seclabel/label") == f"+{owner.uid}:+{owner.gid}"
        assert details["ssh"].startswith("127.0.0.1:")

        conn.close()

        api = MasterApi(master.url, master.admin_token)
        with api.client:
            run_id = node.run_id
            assert run_id is not None
            took = _wait(lambda: api.alive(node_id, run_id), "heartbeat", details)
            print(f"heartbeat {took:.0f} s after the domain started")
            took += _wait(lambda: api.run_status(run_id) is not None, "report", details)
            print(f"report {took:.0f} s after the domain started")
            assert api.run_status(run_id) == "succeeded", console_tail(details, 30)
    finally:
        remove_vm(details, lines.append)

    conn = libvirt_domain.connect(hypervisor.uri)
    assert libvirt_domain.find_domain(conn, details["domain"]) is None
    pool_there = conn.storagePoolLookupByName(pool.name())
    pool_there.refresh(0)
    assert {v.name() for v in pool_there.listAllVolumes(0)} == {base_name}
    conn.close()
    # Idempotent: a second removal finds nothing and says so without failing.
    remove_vm(details, lines.append)
    assert any("kept the shared volume" in line for line in lines)
