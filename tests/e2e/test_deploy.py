"""End to end: one pipeline deployed to three devices of different kinds, the way an
operator does it (docs/fleet.md).

    imagefactory serve --registry (loopback)  ◄── imagefactory builder (bakes qcow2, oci, installer)
    devices add vm-1    --kind vm         libvirtd on this host, a throwaway storage pool
    devices add ctr-1   --kind container  this host, runc
    devices add metal-1 --kind baremetal  the plain base image booted under QEMU, reached over SSH
    deploy vm-1 ctr-1 metal-1 --pipeline hello --wait report
    undeploy vm-1 ctr-1 metal-1

Nothing is built beforehand: deploy submits the three builds, the builder takes them from
the queue, and each device gets its environment through its own path. Three reports reach
the master; undeploy leaves no domain, node volume, container or package behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagefactory.boot.libvirt_backend import open_connection
from imagefactory.boot.qemu import master_forward
from tests.e2e import fleet
from tests.integration.build_fleet import Fleet, admin
from tests.metal_device import Device, booted_device
from tests.registry import local_registry, needs_registry_tools

pytestmark = [pytest.mark.vm, pytest.mark.timeout(5400), needs_registry_tools]

HELLO = fleet.REPO / "examples" / "hello"
DEPLOY_TIMEOUT_S = 3600
"""Three bakes on one builder, then two TCG boots beside each other: generous."""


@contextmanager
def transient_pool() -> Iterator[str]:
    """A transient directory pool on the local libvirtd, destroyed at the end."""
    name = f"fleetbake-e2e-{uuid.uuid4().hex[:8]}"
    # The hypervisor's QEMU runs as its own user: the pool must be where it can go.
    path = Path(tempfile.mkdtemp(prefix="fleetbake-e2e-pool-", dir="/var/tmp"))
    path.chmod(0o711)
    conn = open_connection()
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{name}</name><target><path>{path}</path></target></pool>"
    )
    try:
        yield name
    finally:
        for domain in conn.listAllDomains():  # a node undeploy did not remove
            if domain.name().startswith("fleetbake-vm-1-"):
                if domain.isActive():
                    domain.destroy()
                domain.undefine()
        for volume in pool.listAllVolumes():
            volume.delete()
        pool.destroy()
        conn.close()
        shutil.rmtree(path, ignore_errors=True)


def cli(server_url: str, admin_token: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fleet.imagefactory(*args, "--url", server_url, "--admin-token-file", str(admin_token))


def volumes(pool_name: str) -> list[str]:
    conn = open_connection()
    try:
        return sorted(v.name() for v in conn.storagePoolLookupByName(pool_name).listAllVolumes())
    finally:
        conn.close()


def domains() -> list[str]:
    conn = open_connection()
    try:
        return [d.name() for d in conn.listAllDomains()]
    finally:
        conn.close()


def add_devices(url: str, token: Path, pool: str, metal: Device, guest_master: str) -> None:
    added = [
        cli(url, token, "devices", "add", "vm-1", "--arch", "x86_64", "--kind", "vm",
            "--libvirt-uri", "qemu:///system", "--pool", pool),
        cli(url, token, "devices", "add", "ctr-1", "--arch", "x86_64", "--kind", "container",
            "--container-host", "local", "--runtime", "runc"),
        cli(url, token, "devices", "add", "metal-1", "--arch", "x86_64", "--kind", "baremetal",
            "--ssh", metal.ssh, "--host-key-fingerprint", metal.host_fingerprint,
            "--master-url", guest_master),
    ]  # fmt: skip
    for done in added:
        assert done.returncode == 0, done.stderr


def test_one_pipeline_on_a_vm_a_container_and_a_bare_metal_device(tmp_path: Path) -> None:
    builds = Fleet(tmp_path)
    with local_registry(tmp_path) as registry:
        try:
            server = builds.server(lease_s=120.0, name="master", extra=("--registry", registry))
            token = server.admin_token_file
            archive = tmp_path / "hello.tar.gz"
            pack = [str(fleet.BIN / "executor"), "pack", str(HELLO), "-o", str(archive)]
            subprocess.run(pack, check=True)
            published = cli(server.url, token, "publish", "hello", str(archive))
            assert published.returncode == 0, published.stderr
            builds.builder(server.url, "e2e-builder")
            with (
                transient_pool() as pool,
                booted_device(tmp_path / "metal", server.url) as metal,
            ):
                deploy_and_undeploy(server.url, token, server.secret_file, pool, metal, tmp_path)
        finally:
            print(builds.logs())
            builds.close()


def deploy_and_undeploy(
    url: str, token: Path, secret: Path, pool: str, metal: Device, tmp_path: Path
) -> None:
    # deploy's own node state (the container node's directory and console) stays here
    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    add_devices(url, token, pool, metal, master_forward(url).guest_url)
    names = ["vm-1", "ctr-1", "metal-1"]
    ssh = [
        "--identity-file", str(metal.key), "--known-hosts", str(metal.tmp / "known_hosts"),
        # plain http:// through QEMU's guestfwd relay, which never leaves the host
        "--insecure",
    ]  # fmt: skip
    deployed = fleet.imagefactory(
        "deploy", *names, "--pipeline", "hello", "--wait", "report", "--json",
        "--secret-file", str(secret), *ssh, "--url", url, "--admin-token-file", str(token),
        env=env, timeout=DEPLOY_TIMEOUT_S,
    )  # fmt: skip
    try:
        assert deployed.returncode == 0, (
            f"{deployed.stderr[-6000:]}\n{consoles(tmp_path / 'state')}"
        )
        results = {r["device"]: r for r in json.loads(deployed.stdout)}
        assert {d: (r["kind"], r["status"], r["wait"]) for d, r in results.items()} == {
            "vm-1": ("vm", "deployed", "report (succeeded)"),
            "ctr-1": ("container", "deployed", "report (succeeded)"),
            "metal-1": ("baremetal", "deployed", "report (succeeded)"),
        }
        for device, result in results.items():
            report = admin(url, "GET", f"/v1/runs/{result['run_id']}")
            assert report["status"] == "succeeded" and report["node_id"] == result["node_id"]
            assert result["node_id"].startswith(f"{device}-")
            record = admin(url, "GET", f"/v1/devices/{device}")["deployment"]
            assert record["node_id"] == result["node_id"], record
        vm_node = results["vm-1"]["node_id"]
        assert f"fleetbake-{vm_node}" in domains()
        assert any(vm_node in v for v in volumes(pool)), volumes(pool)
        status, _ = metal.run("dpkg-query -W fleetbake-node", check=False)
        assert status == 0
        # The container ended with its run (runc removes it); its node directory stays.
        ctr_dir = tmp_path / "state" / "imagefactory" / "nodes" / results["ctr-1"]["node_id"]
        assert (ctr_dir / "console.log").is_file()
    finally:
        undeployed = fleet.imagefactory(
            "undeploy", *names, "--json", *ssh[:4], "--url", url,
            "--admin-token-file", str(token), env=env, timeout=900,
        )  # fmt: skip
    assert undeployed.returncode == 0, undeployed.stderr
    assert [r["status"] for r in json.loads(undeployed.stdout)] == ["undeployed"] * 3
    assert f"fleetbake-{vm_node}" not in domains()
    assert not any(vm_node in v for v in volumes(pool)), volumes(pool)
    assert f"fleetbake-{results['ctr-1']['node_id']}" not in runc_containers(tmp_path / "state")
    assert not ctr_dir.exists()
    status, _ = metal.run("dpkg-query -W fleetbake-node", check=False)
    assert status != 0
    for device in names:
        assert admin(url, "GET", f"/v1/devices/{device}")["deployment"] is None


def runc_containers(state_home: Path) -> str:
    """`runc list` of the runc root deploy used (boot/runc.py: under the state home)."""
    root = state_home / "imagefactory" / "runc"
    listed = subprocess.run(["runc", "--root", str(root), "list"], capture_output=True,
                            text=True, check=True)  # fmt: skip
    return listed.stdout


def consoles(state_home: Path) -> str:
    """The last console lines of every node this test's deploy started on this host."""
    tails = []
    for log in sorted(state_home.glob("imagefactory/nodes/*/console.log")):
        lines = log.read_text(errors="replace").splitlines()[-30:]
        tails.append(f"--- {log.parent.name}\n" + "\n".join(lines))
    return "\n".join(tails) or "(no console logs)"
