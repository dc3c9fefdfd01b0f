"""The boot path's parts against the real tools: virt-xml-validate, libvirtd (define and
undefine, no boot), qemu-img overlays, and the guestfwd relay process."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from imagefactory.boot import libvirt_backend, qemu
from imagefactory.targets import get_target


def vm_config(tmp_path: Path, target: str) -> qemu.VmConfig:
    fw = None
    if target == "aarch64-linux":
        fw = qemu.PflashPair(code=tmp_path / "CODE.fd", vars=tmp_path / "vars.fd")
    return qemu.VmConfig(
        name=f"fleetbake-test-{target}",
        target=get_target(target),
        accel="tcg",
        disk=tmp_path / "overlay.qcow2",
        seed=tmp_path / "seed.iso",
        console_log=tmp_path / "console.log",
        ssh_port=2299,
        master=qemu.master_forward("http://127.0.0.1:8080"),
        firmware=fw,
    )


@pytest.mark.parametrize("target", ["x86_64-linux", "aarch64-linux"])
def test_domain_xml_validates_against_libvirts_schema(tmp_path: Path, target: str) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text(libvirt_backend.domain_xml(vm_config(tmp_path, target)))
    validator = shutil.which("virt-xml-validate")
    assert validator, "virt-xml-validate is missing: run scripts/setup-host.sh"
    proc = subprocess.run([validator, str(xml), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validator_rejects_a_broken_domain(tmp_path: Path) -> None:
    xml = tmp_path / "domain.xml"
    xml.write_text("<domain type='qemu'><name>x</name><bogus/></domain>")
    proc = subprocess.run(["virt-xml-validate", str(xml), "domain"], capture_output=True)
    assert proc.returncode != 0


def test_libvirtd_accepts_the_domain_definition(tmp_path: Path) -> None:
    """define + undefine against the real libvirtd (nothing is started)."""
    import libvirt

    conn = libvirt_backend.open_connection()
    config = vm_config(tmp_path, "x86_64-linux")
    dom = conn.defineXML(libvirt_backend.domain_xml(config))
    try:
        defined = dom.XMLDesc(0)
        assert "restrict=on" in defined and "seclabel" in defined
        assert not dom.isActive()
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    assert config.name not in conn.listDefinedDomains()


def test_overlay_is_backed_by_the_unchanged_image(tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    overlay = tmp_path / "node" / "overlay.qcow2"
    overlay.parent.mkdir()
    qemu.create_overlay(image, overlay)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(overlay)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["backing-filename"] == str(image.resolve())
    assert info["backing-filename-format"] == "qcow2"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_overlay_of_an_unreadable_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(click.ClickException, match="is not a disk image QEMU can read"):
        qemu.create_overlay(tmp_path / "missing.qcow2", tmp_path / "o.qcow2")
    assert not (tmp_path / "o.qcow2").exists()


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A loopback server that answers each connection with `echo:` + what it received."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(b"echo:" + data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
    server.close()
    thread.join(5)


def relay_exchange(port: int, payload: bytes) -> tuple[bytes, int]:
    """Run the relay as QEMU would, with the guest connection on stdin/stdout."""
    guest, relay_end = socket.socketpair()
    with guest, relay_end:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imagefactory.boot.relay", "127.0.0.1", str(port)],
            stdin=relay_end.fileno(),
            stdout=relay_end.fileno(),
        )
        relay_end.close()
        guest.sendall(payload)
        guest.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := guest.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: the guest sees a reset, also a close
        return received, proc.wait(30)


def test_relay_carries_both_directions(echo_server: int) -> None:
    payload = bytes(range(256)) * 2048  # 512 KiB, binary
    received, status = relay_exchange(echo_server, payload)
    assert status == 0
    assert received == b"echo:" + payload


def test_relay_closes_the_guest_side_when_the_master_is_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        received, status = relay_exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert received == b"" and status == 1
