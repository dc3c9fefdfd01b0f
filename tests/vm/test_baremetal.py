"""A bare-metal device stood in for by a VM: the plain base image from the cache (no
executor in it), booted under QEMU with a NoCloud seed that carries only an SSH key (for
a sudo-capable user `ops`) and the SSH host key the test made, so the test knows its
fingerprint. `imagefactory install` turns it into a node that heartbeats and reports to a
real `imagefactory serve` on loopback (reached through QEMU's guestfwd relay).

One boot serves the whole module, in order: host-key refusals, the install (next to a
second, unreachable device that must fail alone), the re-run that changes nothing, the
refusals of install.sh on the device, uninstall (each leftover checked), and purge.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from imagefactory.boot import qemu
from tests.installer_bake import bake_installer
from tests.metal_device import Device, booted_device
from tests.ports import closed_port

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

IMAGEFACTORY = str(Path(sys.executable).with_name("imagefactory"))
TARGET = "x86_64-linux"
BOOT_TIMEOUT_S = 600
NODE = "metal-1"


@dataclass(frozen=True)
class Master:
    url: str
    port: int
    secret_file: Path
    admin_token_file: Path

    def get(self, path: str) -> httpx.Response:
        token = self.admin_token_file.read_text().strip()
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    tmp = tmp_path_factory.mktemp("master")
    secret, admin = tmp / "secret", tmp / "admin-token"
    proc = subprocess.Popen(
        [IMAGEFACTORY, "serve", "--port", "0", "--db", str(tmp / "db.sqlite")]
        + ["--secret-file", str(secret), "--admin-token-file", str(admin)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    drain: threading.Thread | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if match := re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line):
                break
        else:
            pytest.fail("imagefactory serve exited without listening")
        drain = threading.Thread(target=proc.stdout.read, daemon=True)
        drain.start()
        yield Master(match[1], int(match[2]), secret, admin)
    finally:
        proc.terminate()
        proc.wait(30)
        if drain is not None:
            drain.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def device(master: Master, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    with booted_device(tmp_path_factory.mktemp("device"), master.url) as dev:
        yield dev


@pytest.fixture(scope="module")
def installer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bake_installer(tmp_path_factory.mktemp("installer"), TARGET)


def install(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IMAGEFACTORY, "install", *args], capture_output=True, text=True, timeout=timeout
    )


def identity(master: Master, device: Device) -> list[str]:
    guest_master = qemu.master_forward(master.url).guest_url
    return [
        "--ssh", device.ssh, "--identity-file", str(device.key),
        "--known-hosts", str(device.tmp / "known_hosts"),
        "--node-id", NODE, "--master", guest_master,
        "--secret-file", str(master.secret_file),
        "--insecure",  # plain http:// through QEMU's guestfwd, which never leaves the host
    ]  # fmt: skip


def test_unknown_or_wrong_host_keys_are_refused(
    installer: Path, master: Master, device: Device
) -> None:
    unknown = install(str(installer), *identity(master, device), "--wait", "none")
    assert unknown.returncode == 1, unknown.stderr
    assert "is not in" in unknown.stderr and device.host_fingerprint in unknown.stderr
    wrong = "SHA256:" + "A" * 43
    mismatch = install(
        str(installer), *identity(master, device), "--wait", "none",
        "--host-key-fingerprint", wrong,
    )  # fmt: skip
    assert mismatch.returncode == 1
    assert "is not the one given with --host-key-fingerprint" in mismatch.stderr
    assert not (device.tmp / "known_hosts").exists()
    status, _ = device.run("test -e /etc/executor || dpkg-query -W fleetbake-node", check=False)
    assert status != 0, "a refused host key must leave the device untouched"


def test_install_makes_a_node_that_heartbeats_and_reports(
    installer: Path, master: Master, device: Device
) -> None:
    closed = closed_port()  # a second device nobody answers for: it fails alone
    result = install(
        str(installer), *identity(master, device), "--ssh", f"ops@127.0.0.1:{closed}",
        "--host-key-fingerprint", device.host_fingerprint,
        "--wait", "report", "--admin-token-file", str(master.admin_token_file),
        "--admin-url", master.url, "--timeout", "600", "--json",
    )  # fmt: skip
    print(result.stderr)  # the per-device progress and the summary, for the test log
    assert result.returncode == 1, result.stderr + "\n" + device.console_tail()
    by_ssh = {o["ssh"]: o for o in json.loads(result.stdout)}
    ok, failed = by_ssh[device.ssh], by_ssh[f"ops@127.0.0.1:{closed}"]
    assert ok["status"] == "installed", result.stderr
    assert ok["wait"] == "report (succeeded)"
    assert ok["node_id"] == NODE + "-1"
    assert failed["status"] == "failed" and "cannot connect" in failed["error"]
    assert f"failed on 1 of 2 device(s): ops@127.0.0.1:{closed}" in result.stderr
    assert f"[{device.ssh}] install.sh: installing fleetbake-node" in result.stderr
    nodes = {n["node_id"]: n for n in master.get("/v1/nodes").json()}
    assert NODE + "-1" in nodes
    run = master.get(f"/v1/runs/{ok['run_id']}").json()
    assert run["status"] == "succeeded"
    _, facts = device.run(
        "dpkg-query -W -f '${db:Status-Abbrev}' fleetbake-node; echo;"
        " systemctl is-enabled executor.service; stat -c '%a %U' /etc/executor/node.env;"
        " getent passwd executor | cut -d: -f6,7; ls /tmp | grep -c fleetbake-install || true"
    )
    assert facts.split("\n")[:5] == [
        "ii ",
        "enabled",
        "600 root",
        "/var/lib/executor:/usr/sbin/nologin",
        "0",
    ], facts


def test_a_second_run_changes_nothing(installer: Path, master: Master, device: Device) -> None:
    # The first run's node id was metal-1-1 (two --ssh); one device keeps the id as given.
    before = device.run(
        "systemctl show -p InvocationID --value executor.service; stat -c %Y /etc/executor/node.env"
    )[1]
    args = [*identity(master, device), "--node-id", NODE + "-1"]
    args += ["--host-key-fingerprint", device.host_fingerprint, "--wait", "none", "--json"]
    result = install(str(installer), *args)
    assert result.returncode == 0, result.stderr
    (outcome,) = json.loads(result.stdout)
    assert outcome["status"] == "unchanged", result.stderr
    assert "nothing to change" in result.stderr
    after = device.run(
        "systemctl show -p InvocationID --value executor.service; stat -c %Y /etc/executor/node.env"
    )[1]
    assert after == before, "the service restarted or node.env was rewritten"


def test_a_newer_installer_upgrades_and_a_new_host_key_can_be_accepted(
    installer: Path, master: Master, device: Device, tmp_path: Path
) -> None:
    newer = bake_installer(tmp_path / "newer", TARGET)  # baked later: a higher version
    version = json.loads((newer / "manifest.json").read_text())["package"]["version"]
    assert version != json.loads((installer / "manifest.json").read_text())["package"]["version"]
    known_hosts = device.tmp / "known_hosts"
    assert not known_hosts.exists()
    args = [*identity(master, device), "--node-id", NODE + "-1", "--accept-new-host-key"]
    result = install(str(newer), *args, "--wait", "heartbeat", "--json")
    assert result.returncode == 0, result.stderr + "\n" + device.console_tail()
    (outcome,) = json.loads(result.stdout)
    assert outcome["status"] == "installed" and outcome["wait"] == "agent started"
    installed = device.run("dpkg-query -W -f '${Version}' fleetbake-node")[1]
    assert installed.splitlines()[-1] == version
    # The key seen first is now recorded, and trusted from here on without a fingerprint.
    assert f"[127.0.0.1]:{device.ssh_port} ecdsa-sha2-nistp256 " not in known_hosts.read_text()
    assert known_hosts.read_text().startswith(f"[127.0.0.1]:{device.ssh_port} ssh-ed25519 ")
    assert known_hosts.stat().st_mode & 0o777 == 0o600


def test_install_sh_refusals_on_the_device(
    installer: Path, device: Device, tmp_path_factory: pytest.TempPathFactory
) -> None:
    script = device.put("install.sh", (installer / "install.sh").read_bytes())
    ident = "--node-id x --master http://10.0.2.100:1 --token t"
    # Missing identity.
    status, out = device.run(f"sh {script} --master http://10.0.2.100:1 --token t", check=False)
    assert status == 2 and "install.sh: error: no node id" in out, out
    # Another architecture: a real aarch64 installer on this amd64 device.
    arm = bake_installer(tmp_path_factory.mktemp("arm"), "aarch64-linux")
    arm_script = device.put("install-arm.sh", (arm / "install.sh").read_bytes())
    status, out = device.run(f"sh {arm_script} {ident}", check=False)
    assert status == 3, out
    assert "this installer is for aarch64-linux (arm64) but this system is amd64" in out
    # Python too old: FAKED (the device has 3.11): a shim answering like Python 3.10.12
    # mounted over /usr/bin/python3 in a private mount namespace of the script alone.
    shim = device.put(
        "python3-shim", b'#!/bin/sh\ncase "$*" in *platform*) echo 3.10.12;; *) exit 1;; esac\n'
    )
    status, out = device.run(
        f"chmod 755 {shim}; unshare -m sh -c 'mount --bind {shim} /usr/bin/python3 && "
        f"exec sh {script} {ident}'",
        check=False,
    )
    assert status == 3 and "Python 3.10.12 at /usr/bin/python3 is older than 3.11" in out, out
    # Not root: ops without sudo.
    status, out = device.run(
        f"setpriv --reuid=ops --regid=ops --init-groups sh {script} {ident}", check=False
    )
    assert status == 3 and "run me as root" in out, out
    # None of these touched the installed node.
    assert device.run("systemctl is-enabled executor.service")[1].strip() == "enabled"


def test_uninstall_leaves_nothing_but_state_and_purge_removes_that(
    installer: Path, master: Master, device: Device
) -> None:
    base = [str(installer), "--ssh", device.ssh, "--identity-file", str(device.key)]
    base += ["--known-hosts", str(device.tmp / "known_hosts")]
    # No fingerprint: the key recorded by --accept-new-host-key is trusted.
    result = install(*base, "--uninstall", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["status"] == "uninstalled"
    checks = {
        "package": "dpkg-query -W -f '${db:Status-Abbrev}' fleetbake-node 2>/dev/null",
        "unit": "ls /lib/systemd/system/executor.service "
        "/etc/systemd/system/multi-user.target.wants/executor.service 2>/dev/null; "
        "systemctl list-units --all --no-legend executor.service",
        "user": "getent passwd executor; getent group executor",
        "node.env": "ls -A /etc/executor 2>/dev/null",
        "process": "pgrep -af 'executor agent' | grep -v pgrep",
        "files": "ls -d /opt/executor /usr/local/bin/executor "
        "/usr/lib/python3/dist-packages/fleetbake-executor.pth 2>/dev/null",
    }
    for what, command in checks.items():
        _, out = device.run(f"{command}; true")
        assert out.strip() == "", f"{what} left behind after --uninstall: {out}"
    assert device.run("test -d /var/lib/executor && echo kept")[1].strip() == "kept"
    purged = install(*base, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert device.run("ls -d /var/lib/executor 2>/dev/null; true")[1].strip() == ""
