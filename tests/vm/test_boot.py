"""Boot the baked x86_64 image for real: two QEMU clones and one libvirt node at once,
reporting to a real `imagefactory serve` through the guestfwd relay.

The nodes run a probe pipeline from the master's gateway that returns the variables the
executor process sees. Its PROBE variable is hostile (quotes, `$`, backticks, backslashes,
unicode), so the report proves that node.env as rendered is read back exactly by systemd's
`EnvironmentFile=` in the guest. Everything else is checked over SSH (`imagefactory ssh`).
All boots happen in one module fixture, so the module costs one boot time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from imagefactory.boot import nodestate, ssh
from tests.baking import BakedImage

pytestmark = [pytest.mark.vm, pytest.mark.timeout(3600)]

IMAGEFACTORY = [str(Path(sys.executable).with_name("imagefactory"))]
HOSTILE = "sp ace \"dq\" 'sq' a=b $HOME ${X} `id` back\\slash \\\\ ü✓ #h"
QEMU_NODES = ("vmq-1", "vmq-2")
LIBVIRT_NODE = "vml"
BOOT_TIMEOUT_S = "2400"

PROBE_PIPELINE = {
    "format": 1,
    "name": "envprobe",
    "tasks": [{"id": "probe", "call": "probe:probe"}],
}
PROBE_CODE = textwrap.dedent(
    """
    import os

    KEYS = ("PROBE", "EXECUTOR_NODE_ID", "EXECUTOR_RUN_ID", "EXECUTOR_MASTER_URL")

    def readable(path):
        try:
            with open(path, "rb") as f:
                f.read(1)
            return True
        except OSError:
            return False

    def openable(path):  # /proc/PID/mem: opening it is the access check (offset 0 is unmapped)
        try:
            os.close(os.open(path, os.O_RDONLY))
            return True
        except OSError:
            return False

    def writable(path):
        try:
            with open(path, "w") as f:
                f.write("x")
            os.remove(path)
            return True
        except OSError:
            return False

    def agent_pid():
        pid = os.getpid()
        while pid > 1:
            if b"agent" in open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0"):
                return pid
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        return None

    def isolation():
        agent = agent_pid()
        return {
            "uid": os.getuid(),
            "agent_found": agent is not None,
            "agent_environ_readable": agent is not None and readable(f"/proc/{agent}/environ"),
            "agent_memory_readable": agent is not None and openable(f"/proc/{agent}/mem"),
            "secrets_readable": [p for p in SECRETS if readable(p)],
            "writable": sorted(p for p in PLACES if writable(p)),
        }

    SECRETS = ("/etc/executor/node.env", "/dev/sr0", "/var/lib/cloud/instance/user-data.txt",
               "/etc/ssh/ssh_host_ed25519_key")
    PLACES = ("/etc/probe", "/opt/executor/probe", "/usr/local/bin/probe", "/root/probe",
              "/home/probe", "/var/lib/executor/probe", "/tmp/probe")

    def probe(ctx):
        return {"env": {k: os.environ.get(k) for k in KEYS}, "ctx_node_id": ctx.node_id,
                "token_in_environ": "EXECUTOR_TOKEN" in os.environ, "isolation": isolation()}
    """
)

GUEST_CHECK = textwrap.dedent(
    """
    import glob, json, os, socket, subprocess
    def reach(host, port):
        try:
            socket.create_connection((host, port), 5).close()
            return True
        except OSError:
            return False
    st = os.stat("/etc/executor/node.env")
    print(json.dumps({
        "env_mode": oct(st.st_mode & 0o777), "env_uid": st.st_uid,
        "env_readable_by_ops": os.access("/etc/executor/node.env", os.R_OK),
        "machine_id": open("/etc/machine-id").read().strip(),
        "hostname": socket.gethostname(),
        "host_key": subprocess.run(["sudo", "-n", "cat", "/etc/ssh/ssh_host_ed25519_key.pub"],
                                   capture_output=True, text=True).stdout.split()[1],
        "host_keys": sorted(glob.glob("/etc/ssh/ssh_host_*_key.pub")),
        "instance_id": json.load(open("/run/cloud-init/instance-data.json"))["v1"]["instance_id"],
        "reach_master": reach("10.0.2.100", PORT),
        "reach_host_loopback": reach("10.0.2.2", PORT),
        "reach_outside": reach("192.0.2.1", 80),
        "sudo_uid": subprocess.run(["sudo", "-n", "id", "-u"], capture_output=True,
                                   text=True).stdout.strip(),
    }))
    """
)


@dataclass(frozen=True)
class Master:
    url: str
    port: int
    secret_file: Path
    admin_token_file: Path

    def get(self, path: str) -> httpx.Response:
        token = self.admin_token_file.read_text().strip()
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {token}"})


@dataclass(frozen=True)
class Fleet:
    master: Master
    env: dict[str, str]
    """Environment for imagefactory subprocesses (a private XDG_STATE_HOME)."""
    nodes: dict[str, dict[str, Any]]
    """node ID -> its `boot --json` summary."""
    image: Path
    image_sha256: str


def imagefactory(*args: str, env: dict[str, str], timeout: float = 600) -> str:
    proc = subprocess.run(
        [*IMAGEFACTORY, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"imagefactory {shlex.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    tmp = tmp_path_factory.mktemp("master")
    secret, admin = tmp / "secret", tmp / "admin-token"
    proc = subprocess.Popen(
        [*IMAGEFACTORY, "serve", "--port", "0", "--db", str(tmp / "db.sqlite")]
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
        # Keep reading its log, so that a full pipe never blocks the server.
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


def publish_probe(master: Master, tmp: Path, env: dict[str, str]) -> str:
    """Pack and publish the probe pipeline; its sha256."""
    src = tmp / "envprobe"
    src.mkdir()
    (src / "pipeline.json").write_text(json.dumps(PROBE_PIPELINE))
    (src / "probe.py").write_text(PROBE_CODE)
    archive = tmp / "envprobe.tar.gz"
    packed = subprocess.run(
        [sys.executable, "-m", "executor", "pack", str(src), "-o", str(archive)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sha = re.search(r"[0-9a-f]{64}", packed)
    assert sha, packed
    imagefactory(
        "publish", "envprobe", str(archive), "--url", master.url,
        "--admin-token-file", str(master.admin_token_file), env=env,
    )  # fmt: skip
    return sha[0]


def boot_args(image: Path, master: Master, sha: str) -> list[str]:
    return [
        "boot", str(image), "--master", master.url, "--secret-file", str(master.secret_file),
        "--admin-token-file", str(master.admin_token_file), "--on-complete", "none",
        "--wait", "report", "--keep", "--json", "--timeout", BOOT_TIMEOUT_S,
        "--env", f"PROBE={HOSTILE}", "--env", "EXECUTOR_PIPELINE=gateway:envprobe",
        "--env", f"EXECUTOR_PIPELINE_SHA256={sha}",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fleet(
    baked_image: BakedImage, master: Master, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
    image_sha = subprocess.run(
        ["sha256sum", str(baked_image.image)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    args = boot_args(baked_image.image, master, publish_probe(master, tmp, env))
    runs = [
        [*args, "--node-id", "vmq", "--count", "2", "--backend", "qemu"],
        [*args, "--node-id", LIBVIRT_NODE, "--backend", "libvirt"],
    ]
    procs = [
        subprocess.Popen(
            [*IMAGEFACTORY, *a], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for a in runs
    ]
    try:
        nodes: dict[str, dict[str, Any]] = {}
        for proc in procs:
            out, err = proc.communicate(timeout=float(BOOT_TIMEOUT_S) + 300)
            assert proc.returncode == 0, f"boot failed ({proc.returncode}):\n{err}"
            nodes.update({n["node_id"]: n for n in json.loads(out)})
        yield Fleet(master, env, nodes, baked_image.image, image_sha)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # boot cleans its nodes up on SIGTERM
            proc.communicate(timeout=120)  # also closes the pipes
        subprocess.run([*IMAGEFACTORY, "stop", "--all"], env=env, capture_output=True, timeout=300)


def guest_facts(fleet: Fleet, node_id: str) -> dict[str, Any]:
    script = GUEST_CHECK.replace("PORT", str(fleet.master.port))
    out = imagefactory("ssh", node_id, "--", "python3", "-c", shlex.quote(script), env=fleet.env)
    facts: dict[str, Any] = json.loads(out)
    return facts


@pytest.fixture(scope="module")
def facts(fleet: Fleet) -> dict[str, dict[str, Any]]:
    return {node_id: guest_facts(fleet, node_id) for node_id in sorted(fleet.nodes)}


def test_all_nodes_booted_on_their_backend(fleet: Fleet) -> None:
    assert set(fleet.nodes) == {*QEMU_NODES, LIBVIRT_NODE}
    for node_id, node in fleet.nodes.items():
        assert node["backend"] == ("libvirt" if node_id == LIBVIRT_NODE else "qemu")
        assert node["outcome"] == "report (succeeded)" and node["run_status"] == "succeeded"


def test_reports_show_the_variables_the_executor_read(fleet: Fleet) -> None:
    """Through guestfwd: pipeline download, heartbeats and report; node.env through systemd."""
    for node_id, node in fleet.nodes.items():
        response = fleet.master.get(f"/v1/runs/{node['run_id']}")
        assert response.status_code == 200, response.text
        report = response.json()
        assert report["node_id"] == node_id and report["status"] == "succeeded", report
        result = report["tasks"]["probe"]["result"]
        assert {k: result[k] for k in ("env", "ctx_node_id")} == {
            "env": {
                "PROBE": HOSTILE,
                "EXECUTOR_NODE_ID": node_id,
                "EXECUTOR_RUN_ID": node["run_id"],
                "EXECUTOR_MASTER_URL": f"http://10.0.2.100:{fleet.master.port}",
            },
            "ctx_node_id": node_id,
        }


def test_tasks_run_unprivileged_and_see_no_secret(fleet: Fleet) -> None:
    """The agent's unit: an unprivileged user, read-only system, no token anywhere a task
    can look, writes only to the state directory and a private /tmp."""
    for node in fleet.nodes.values():
        result = fleet.master.get(f"/v1/runs/{node['run_id']}").json()["tasks"]["probe"]
        seen = result["result"]["isolation"]
        assert result["result"]["token_in_environ"] is False
        assert seen["uid"] != 0 and seen["agent_found"] is True
        assert seen["agent_environ_readable"] is False and seen["agent_memory_readable"] is False
        assert seen["secrets_readable"] == []
        assert seen["writable"] == ["/tmp/probe", "/var/lib/executor/probe"]


def test_console_carries_the_agents_status_lines(fleet: Fleet) -> None:
    for node_id, node in fleet.nodes.items():
        text = Path(node["console_log"]).read_text(errors="replace")
        assert f"EXECUTOR-STATUS node={node_id} run={node['run_id']} state=starting" in text


def test_node_env_is_root_only(facts: dict[str, dict[str, Any]]) -> None:
    for node_facts in facts.values():
        assert node_facts["env_mode"] == "0o600" and node_facts["env_uid"] == 0
        assert node_facts["env_readable_by_ops"] is False


def test_clones_have_their_own_identities(fleet: Fleet, facts: dict[str, dict[str, Any]]) -> None:
    for node_id, node_facts in facts.items():
        assert node_facts["hostname"] == node_id
        assert node_facts["instance_id"] == fleet.nodes[node_id]["instance_id"]
    for key in ("machine_id", "host_key", "instance_id"):
        values = [f[key] for f in facts.values()]
        assert len(set(values)) == len(values), (key, values)
        assert all(values)


def test_the_host_key_is_the_one_pinned_at_boot(
    fleet: Fleet, facts: dict[str, dict[str, Any]]
) -> None:
    for node_id, node_facts in facts.items():
        pinned = (Path(fleet.nodes[node_id]["workdir"]) / "known_hosts").read_text().split()
        assert pinned[1:3] == ["ssh-ed25519", node_facts["host_key"]]
        # No other key for a client to be offered and trust on first use.
        assert node_facts["host_keys"] == ["/etc/ssh/ssh_host_ed25519_key.pub"]


def test_guests_reach_the_master_and_nothing_else(facts: dict[str, dict[str, Any]]) -> None:
    for node_facts in facts.values():
        assert node_facts["reach_master"] is True
        assert node_facts["reach_host_loopback"] is False
        assert node_facts["reach_outside"] is False


def test_ops_has_passwordless_sudo(facts: dict[str, dict[str, Any]]) -> None:
    for node_facts in facts.values():
        assert node_facts["sudo_uid"] == "0"


def test_password_logins_are_refused(fleet: Fleet) -> None:
    for node in fleet.nodes.values():
        for user in ("ops", "root"):
            assert ssh.password_login_refused(node["ssh_port"], user)


def test_stop_ends_the_vms_and_removes_the_overlays(fleet: Fleet) -> None:
    # Runs last in this module: afterwards the nodes are gone.
    imagefactory("stop", *sorted(fleet.nodes), env=fleet.env)
    for node in fleet.nodes.values():
        workdir = Path(node["workdir"])
        assert {p.name for p in workdir.iterdir()} <= {"console.log", "qemu.log"}
        if node["pid"]:
            assert not nodestate.qemu_alive(node["pid"], f"fleetbake-{node['node_id']}")
    domains = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert f"fleetbake-{LIBVIRT_NODE}" not in domains
    sha = subprocess.run(
        ["sha256sum", str(fleet.image)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    assert sha == fleet.image_sha256  # the image itself was never written


def test_timeout_shows_the_console_and_cleans_up(baked_image: BakedImage, tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(
        [*IMAGEFACTORY, "boot", str(baked_image.image), "--node-id", "vmt", "--wait", "ssh"]
        + ["--timeout", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "timed out after 20 s waiting for 'ssh' on vmt" in proc.stderr
    assert "last console lines of node vmt:" in proc.stderr
    assert "Traceback" not in proc.stderr
    workdir = tmp_path / "state" / "imagefactory" / "nodes" / "vmt"
    assert {p.name for p in workdir.iterdir()} <= {"console.log", "qemu.log"}
    running = subprocess.run(["pgrep", "-f", "fleetbake-vmt"], capture_output=True)
    assert running.returncode == 1  # no such process
