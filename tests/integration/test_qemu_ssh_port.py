"""The SSH port of a booted node is QEMU's own pick, read back over a private QMP monitor,
with a real QEMU (no guest boots: the disk is blank, and the firmware waits)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from imagefactory.boot import qemu
from imagefactory.targets import get_target


@pytest.fixture
def config(tmp_path: Path) -> qemu.VmConfig:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    (tmp_path / "seed.iso").write_bytes(b"\0" * 2048)
    return qemu.VmConfig(
        name="fleetbake-port-test",
        target=get_target("x86_64-linux"),
        accel="tcg",
        disk=disk,
        seed=tmp_path / "seed.iso",
        console_log=tmp_path / "console.log",
        ssh_port=0,
        memory_mib=128,
        cpus=1,
    )


@pytest.fixture
def started() -> Iterator[list[qemu.QemuMachine]]:
    machines: list[qemu.QemuMachine] = []
    yield machines
    for machine in machines:
        machine.stop()


def test_each_qemu_binds_its_own_ssh_port_and_says_which(
    config: qemu.VmConfig, tmp_path: Path, started: list[qemu.QemuMachine]
) -> None:
    for n in range(2):
        disk = tmp_path / f"disk-{n}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        named = dataclasses.replace(config, name=f"fleetbake-port-test-{n}", disk=disk)
        started.append(qemu.start(named, tmp_path / f"qemu-{n}.log", die_with_parent=True))
    ports = [machine.ssh_port() for machine in started]
    assert len(set(ports)) == 2 and all(port > 0 for port in ports)
    for port in ports:  # QEMU itself listens there (nobody else could have the port)
        with socket.create_connection(("127.0.0.1", port), timeout=10):
            pass
    assert all(machine.running() for machine in started)


def test_the_monitor_has_no_socket_path_anyone_could_connect_to(
    config: qemu.VmConfig, tmp_path: Path, started: list[qemu.QemuMachine]
) -> None:
    machine = qemu.start(config, tmp_path / "qemu.log", die_with_parent=True)
    started.append(machine)
    # Looked at before the port is asked: then this end is closed, and QEMU closes its own.
    fds = Path(f"/proc/{machine.pid}/fd")
    links = set()
    for fd in os.listdir(fds):
        with contextlib.suppress(FileNotFoundError):  # QEMU opens and closes files at start
            links.add(os.readlink(fds / fd))
    inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    unix = [row.split() for row in Path("/proc/net/unix").read_text().splitlines()[1:]]
    held = [row for row in unix if row[6] in inodes]
    assert held, "QEMU holds no unix socket: is the monitor there at all?"
    named = [row[7] for row in held if len(row) > 7]
    assert named == [], f"anyone could connect to QEMU's monitor at {named}"
    assert machine.ssh_port() == machine.ssh_port()  # asked once, then remembered
    assert machine.running()


def test_a_long_tmpdir_does_not_matter(
    config: qemu.VmConfig,
    tmp_path: Path,
    started: list[qemu.QemuMachine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A socket path holds at most 107 bytes; the monitor needs none."""
    deep = tmp_path / ("d" * 100) / ("e" * 100)
    deep.mkdir(parents=True)
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    machine = qemu.start(config, tmp_path / "qemu.log", die_with_parent=True)
    started.append(machine)
    assert machine.ssh_port() > 0


def test_a_qemu_that_fails_at_start_is_one_error_with_its_reason(
    config: qemu.VmConfig, tmp_path: Path, started: list[qemu.QemuMachine]
) -> None:
    broken = dataclasses.replace(config, disk=tmp_path / "missing.qcow2")
    machine = qemu.start(broken, tmp_path / "qemu.log", die_with_parent=True)
    started.append(machine)
    with pytest.raises(click.ClickException) as failed:
        machine.ssh_port()
    message = failed.value.message
    assert message.startswith("QEMU of fleetbake-port-test failed at start: ")
    assert "missing.qcow2" in message, message
    assert "\n" not in message
