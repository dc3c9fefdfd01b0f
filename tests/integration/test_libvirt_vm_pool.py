"""Deploy's libvirt pieces against the real libvirtd (qemu:///system), nothing booted:
the sparse upload into a throwaway dir pool, reuse and re-upload of the base volume,
overlay and seed volumes, reading the console back, refusals for bad pools and
unreachable hypervisors, and the deploy domain XML validated and defined."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from imagefactory.bake.cache import sha256_file
from imagefactory.boot import libvirt_backend, qemu
from imagefactory.deploy import libvirt_domain, libvirt_pool, libvirt_vm
from imagefactory.targets import get_target
from tests.integration.services_harness import free_port

LOCAL = "qemu:///system"
DIGEST = "sha256:" + "5a" * 32


@pytest.fixture
def conn() -> Iterator[Any]:
    with libvirt_domain.connected(LOCAL) as opened:
        yield opened


@pytest.fixture
def pool(conn: Any) -> Iterator[Any]:
    """A transient dir pool in a fresh directory the hypervisor's QEMU user can enter."""
    directory = Path(tempfile.mkdtemp(prefix="fleetbake-pool-", dir="/var/tmp"))
    directory.chmod(0o711)
    name = f"fleetbake-test-{uuid.uuid4().hex[:8]}"
    xml = f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>"
    created = conn.storagePoolCreateXML(xml, 0)
    try:
        yield libvirt_pool.open_pool(conn, name, LOCAL)
    finally:
        created.refresh(0)
        for vol in created.listAllVolumes(0):
            vol.delete(0)
        created.destroy()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def sparse_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real qcow2 of 256 MiB file length with 1 MiB of guest data: mostly holes."""
    image = tmp_path_factory.mktemp("image") / "image.qcow2"
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata"]
    subprocess.run([*create, str(image), "256M"], check=True)
    write = ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 100M 1M", str(image)]
    subprocess.run(write, check=True, capture_output=True)
    # Zeros after the header inside the first cluster, as a hole (like a baked image):
    # a sparse stream ending in a hole truncates the volume there.
    with image.open("rb") as f:
        f.seek(4096)
        assert f.read(61440) == bytes(61440)
    subprocess.run(["fallocate", "--punch-hole", "-o", "4096", "-l", "61440", str(image)])
    fd = os.open(image, os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 4096
    finally:
        os.close(fd)
    return image


def test_sparse_upload_sends_only_data_and_arrives_whole(pool: Any, sparse_image: Path) -> None:
    info = libvirt_vm.image_info(sparse_image)
    owner = libvirt_domain.qemu_owner(pool.connect(), "qemu")
    name = libvirt_pool.base_volume_name(DIGEST)
    lines: list[str] = []
    vol, uploaded = libvirt_pool.upload_base(pool, name, sparse_image, info, owner, lines.append)
    assert uploaded
    path = Path(vol.path())
    assert sha256_file(path) == sha256_file(sparse_image)
    assert vol.info()[1] == info.virtual_size == 256 << 20  # libvirt sees the qcow2 inside
    # Holes stay holes on the far side: a few MiB allocated for a 256 MiB file.
    assert os.stat(path).st_blocks * 512 < 8 << 20
    assert os.stat(path).st_size == info.size
    sent = next(line for line in lines if "uploaded" in line)
    assert float(sent.split("uploaded ")[1].split()[0]) < 8  # MiB of data over the wire
    stat = os.stat(path)
    assert (stat.st_uid, stat.st_gid, stat.st_mode & 0o777) == (owner.uid, owner.gid, 0o644)

    # A second deploy of the same digest reuses the volume.
    again, uploaded = libvirt_pool.upload_base(pool, name, sparse_image, info, owner, lines.append)
    assert not uploaded and again.path() == vol.path()
    assert any("reused" in line for line in lines)


def test_an_interrupted_upload_is_not_reused(pool: Any, sparse_image: Path) -> None:
    info = libvirt_vm.image_info(sparse_image)
    owner = libvirt_domain.qemu_owner(pool.connect(), "qemu")
    name = libvirt_pool.base_volume_name(DIGEST)
    # What a killed upload leaves: the volume with everything but the header (sent last),
    # or with only part of the body.
    for end in (info.size, info.size // 2):
        libvirt_pool.delete_volume(pool, name)
        xml = libvirt_pool._volume_xml(name, info.size, "raw", owner, 0o644)
        part = pool.createXML(xml, 0)
        start = libvirt_pool.HEADER_BYTES
        libvirt_pool.send_sparse(part, sparse_image, start, end, lambda _: None)
        pool.refresh(0)
        part = pool.storageVolLookupByName(name)
        assert not libvirt_pool.is_complete(part, info)
    lines: list[str] = []
    vol, uploaded = libvirt_pool.upload_base(pool, name, sparse_image, info, owner, lines.append)
    assert uploaded and any("incomplete" in line for line in lines)
    assert sha256_file(Path(vol.path())) == sha256_file(sparse_image)


def test_node_volumes_overlay_seed_and_console_read_back(pool: Any, sparse_image: Path) -> None:
    info = libvirt_vm.image_info(sparse_image)
    owner = libvirt_domain.qemu_owner(pool.connect(), "qemu")
    base, _ = libvirt_pool.upload_base(
        pool, libvirt_pool.base_volume_name(DIGEST), sparse_image, info, owner, lambda _: None
    )
    names = libvirt_pool.node_volume_names("n-1")
    overlay = libvirt_pool.create_overlay(pool, names["disk"], base, info, owner)
    probed = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", overlay.path()],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert f'"backing-filename": "{base.path()}"' in probed
    assert '"backing-filename-format": "qcow2"' in probed
    seed_data = os.urandom(70000)
    seed_vol = libvirt_pool.upload_bytes(pool, names["seed"], seed_data, owner)
    assert Path(seed_vol.path()).read_bytes() == seed_data
    for vol in (overlay, seed_vol):
        assert os.stat(vol.path()).st_mode & 0o777 == 0o600  # the seed holds the token

    # The console, as virtlogd writes it beside the volumes, read over the connection.
    console = Path(libvirt_pool.pool_directory(pool)) / names["console"]
    console.write_text("".join(f"line {i}\n" for i in range(100)))
    details = {
        "uri": LOCAL,
        "pool": pool.name(),
        "domain": "fleetbake-n-1",
        "volumes": list(names.values()),
    }
    assert libvirt_vm.console_tail(details, 3) == ["line 97", "line 98", "line 99"]

    lines: list[str] = []
    libvirt_vm.remove_vm(details, lines.append)
    pool.refresh(0)
    assert {v.name() for v in pool.listAllVolumes(0)} == {base.name()}
    assert sorted(lines) == sorted(f"volume {n}: deleted" for n in names.values())
    libvirt_vm.remove_vm(details, lines.append)  # idempotent: nothing left, no error
    assert len(lines) == 3


def test_unknown_and_inactive_pools_are_one_line_errors(conn: Any) -> None:
    with pytest.raises(click.ClickException, match="no storage pool 'no-such-pool' at"):
        libvirt_pool.open_pool(conn, "no-such-pool", LOCAL)
    name = f"fleetbake-test-{uuid.uuid4().hex[:8]}"
    xml = f"<pool type='dir'><name>{name}</name><target><path>/var/tmp</path></target></pool>"
    defined = conn.storagePoolDefineXML(xml, 0)
    try:
        with pytest.raises(click.ClickException, match="is not active"):
            libvirt_pool.open_pool(conn, name, LOCAL)
    finally:
        defined.undefine()


def test_an_unreachable_hypervisor_is_a_one_line_error() -> None:
    uri = f"qemu+ssh://root@127.0.0.1:{free_port()}/system?no_tty=1"
    with pytest.raises(click.ClickException, match="cannot connect to the hypervisor") as exc:
        libvirt_domain.connect(uri)
    assert "\n" not in exc.value.message


def deploy_domain(target: str, pool: str, directory: Path) -> str:
    names = libvirt_pool.node_volume_names(f"xml-{target}")
    config = qemu.VmConfig(
        name=f"fleetbake-xml-{target}",
        target=get_target(target),
        accel="tcg",
        disk=directory / names["disk"],
        seed=directory / names["seed"],
        console_log=directory / names["console"],
        ssh_port=0,
        master=qemu.master_forward("http://127.0.0.1:8750", relay="socat"),
    )
    return libvirt_backend.domain_xml(config, 64055, 64055, pool=pool)


@pytest.mark.parametrize("target", ["x86_64-linux", "aarch64-linux"])
def test_deploy_domains_validate_and_libvirtd_starts_them(
    conn: Any, pool: Any, target: str, tmp_path: Path
) -> None:
    """Validated, defined and started for a moment on empty volumes: libvirt resolves the
    pool volumes, and on aarch64 picks the hypervisor's UEFI and makes the NVRAM."""
    directory = Path(libvirt_pool.pool_directory(pool))
    xml = tmp_path / "domain.xml"
    xml.write_text(deploy_domain(target, pool.name(), directory))
    proc = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    owner = libvirt_domain.qemu_owner(conn, "qemu")
    names = libvirt_pool.node_volume_names(f"xml-{target}")
    empty = libvirt_vm.image_info(make_qcow2(tmp_path / "empty.qcow2"))
    base = libvirt_pool.upload_base(
        pool, "fleetbake-empty.qcow2", tmp_path / "empty.qcow2", empty, owner, lambda _: None
    )[0]
    libvirt_pool.create_overlay(pool, names["disk"], base, empty, owner)
    libvirt_pool.upload_bytes(pool, names["seed"], bytes(2048), owner)
    dom = libvirt_domain.start_domain(conn, xml.read_text(), f"fleetbake-xml-{target}")
    try:
        running = ET.fromstring(dom.XMLDesc(0))
        sources = [d.find("source") for d in running.iterfind("devices/disk")]
        assert [s.get("pool") for s in sources if s is not None] == [pool.name()] * 2
        nvram = running.findtext("os/nvram")
        if target == "aarch64-linux":
            assert running.find("os/loader") is not None and nvram
            assert Path(nvram).is_file()
    finally:
        assert libvirt_domain.remove_domain(conn, dom.name())
    assert libvirt_domain.find_domain(conn, dom.name()) is None
    assert nvram is None or not Path(nvram).exists()  # undefined with its NVRAM
    assert not libvirt_domain.remove_domain(conn, dom.name())  # gone is fine


def make_qcow2(path: Path) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def test_undeploy_from_an_inactive_pool_says_the_volumes_stay(conn: Any) -> None:
    directory = Path(tempfile.mkdtemp(prefix="fleetbake-pool-", dir="/var/tmp"))
    name = f"fleetbake-test-{uuid.uuid4().hex[:8]}"
    xml = f"<pool type='dir'><name>{name}</name><target><path>{directory}</path></target></pool>"
    defined = conn.storagePoolDefineXML(xml, 0)
    try:
        defined.create(0)
        names = libvirt_pool.node_volume_names("n-2")
        owner = libvirt_domain.qemu_owner(conn, "qemu")
        libvirt_pool.upload_bytes(defined, names["seed"], b"seed", owner)
        details = {
            "uri": LOCAL,
            "pool": name,
            "domain": "fleetbake-n-2",
            "volumes": [names["seed"]],
        }
        defined.destroy()
        with pytest.raises(click.ClickException, match="not active: the node's volumes stay"):
            libvirt_vm.remove_vm(details, lambda _: None)
        assert (directory / names["seed"]).exists()
        defined.create(0)
        lines: list[str] = []
        libvirt_vm.remove_vm(details, lines.append)
        assert lines == [f"volume {names['seed']}: deleted"]
        assert not (directory / names["seed"]).exists()
    finally:
        if defined.isActive():
            defined.destroy()
        defined.undefine()
        shutil.rmtree(directory, ignore_errors=True)
