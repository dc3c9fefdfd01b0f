"""A bare-metal device stood in for by a VM: the plain base image from the cache (no
executor in it), booted under QEMU with a NoCloud seed that carries only an SSH key (for
a sudo-capable user `ops`) and the SSH host key the test made, so the test knows its
fingerprint. The master is reached through QEMU's guestfwd relay, as a device on the
network would reach it. Used by tests/vm/test_baremetal.py and tests/e2e/test_deploy.py.
"""

from __future__ import annotations

import base64
import json
import shlex
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import paramiko
import pytest

from imagefactory.bake.base import BaseSpec, build_base
from imagefactory.bake.cache import BaseCache
from imagefactory.boot import qemu, seed
from imagefactory.boot.nodestate import make_ssh_key
from imagefactory.boot.ssh import banner_ready
from imagefactory.host.accel import pick_accelerator
from imagefactory.install.hostkeys import fingerprint
from imagefactory.stages import Stages
from imagefactory.targets import get_target

BOOT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Device:
    ssh_port: int
    key: Path
    """The private key authorized for `ops`."""
    host_fingerprint: str
    console_log: Path
    tmp: Path

    @property
    def ssh(self) -> str:
        return f"ops@127.0.0.1:{self.ssh_port}"

    def _connect(self) -> paramiko.SSHClient:
        """A login as `ops` with the test's key (the test trusts its own device)."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect(
            "127.0.0.1", port=self.ssh_port, username="ops", key_filename=str(self.key),
            allow_agent=False, look_for_keys=False, timeout=30,
        )  # fmt: skip
        return client

    def run(self, command: str, check: bool = True) -> tuple[int, str]:
        """Run a command as root on the device (sudo); (status, stdout+stderr)."""
        client = self._connect()
        try:
            _, out, _ = client.exec_command(f"sudo -n sh -c {shlex.quote(command)} 2>&1")
            text = out.read().decode()
            status = out.channel.recv_exit_status()
        finally:
            client.close()
        if check:
            assert status == 0, f"{command}: {status}\n{text}"
        return status, text

    def put(self, name: str, data: bytes) -> str:
        """Upload a file to /tmp on the device; its path."""
        client = self._connect()
        try:
            with client.open_sftp() as sftp, sftp.open(f"/tmp/{name}", "wb") as f:
                f.write(data)
        finally:
            client.close()
        return f"/tmp/{name}"

    def console_tail(self, lines: int = 40) -> str:
        text = self.console_log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def device_seed(public_key: str, host_key: seed.HostKey, name: str) -> seed.Seed:
    """Only an SSH login (ops, passwordless sudo) and the host key: nothing of fleetbake."""
    user_data = "#cloud-config\n" + json.dumps(
        {
            "ssh_keys": {"ed25519_private": host_key.private, "ed25519_public": host_key.public},
            "ssh_genkeytypes": [],
            "ssh_pwauth": False,
            "manage_etc_hosts": True,  # sudo resolves the host name
            "disable_root": True,
            "users": [
                {
                    "name": "ops",
                    "lock_passwd": True,
                    "shell": "/bin/bash",
                    "sudo": "ALL=(ALL) NOPASSWD:ALL",
                    "ssh_authorized_keys": [public_key],
                }
            ],
        }
    )
    files = {
        "user-data": user_data,
        "meta-data": f"instance-id: iid-{name}\nlocal-hostname: {name}\n",
        "network-config": 'version: 2\nethernets:\n  wired:\n    match:\n      name: "e*"\n'
        "    dhcp4: true\n",
    }
    return seed.Seed(f"iid-{name}", name, files)


@contextmanager
def booted_device(tmp: Path, master_url: str, name: str = "metal-1") -> Iterator[Device]:
    """Boot the device (x86_64), wait until `ops` can log in, and stop it at the end."""
    tmp.mkdir(parents=True, exist_ok=True)
    target = get_target("x86_64-linux")
    base = build_base(BaseSpec(target), BaseCache(), Stages())
    overlay = tmp / "disk.qcow2"
    qemu.create_overlay(base.image, overlay)
    key_file, public = make_ssh_key(tmp, "fleetbake-test")
    host_key = seed.HostKey.generate()
    seed_iso = tmp / "seed.iso"
    seed.write_iso(device_seed(public, host_key, name), seed_iso)
    config = qemu.VmConfig(
        name=f"fleetbake-{name}",
        target=target,
        accel=pick_accelerator(target),
        disk=overlay,
        seed=seed_iso,
        console_log=tmp / "console.log",
        ssh_port=0,  # QEMU's pick
        master=qemu.master_forward(master_url),
        memory_mib=1024,
        cpus=2,
    )
    key_type, key_data = host_key.public.split()[:2]
    host_public = paramiko.PKey.from_type_string(key_type, base64.b64decode(key_data))
    machine = qemu.start(config, tmp / "qemu.log", die_with_parent=True)
    try:
        port = machine.ssh_port()
        dev = Device(port, key_file, fingerprint(host_public), config.console_log, tmp)
        deadline = BOOT_TIMEOUT_S
        while deadline > 0 and machine.running():
            if banner_ready(port):
                status, _ = probe_login(dev)
                if status == 0:
                    break
            deadline -= 5
            threading.Event().wait(5)
        else:
            pytest.fail(f"the device did not come up over SSH:\n{dev.console_tail()}")
        yield dev
    finally:
        machine.stop()


def probe_login(dev: Device) -> tuple[int, str]:
    """cloud-init creates `ops` a little after sshd answers."""
    try:
        return dev.run("cloud-init status --wait >/dev/null; true", check=False)
    except (OSError, EOFError, paramiko.SSHException):
        return 1, ""
