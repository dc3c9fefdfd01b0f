"""The agent's place in the boot of a real node: what it waits for and what else starts.

Boot the baked x86_64 image once and read systemd's own view over SSH: the agent's
direct ordering, every unit it is ordered after (transitively), and the services
enabled. It fails if the agent is again ordered after cloud-init stages it does not need
(cloud-config, cloud-final, cloud-init.target), or if a service is enabled that the
image does not list on purpose; also that cloud-init-local applied the seed (so the
network stage was skipped), that those later stages run niced beside the agent and that
the root was checked in the initramfs (so systemd-fsck-root is skipped). It
checks no time (benchmarks/boot.py measures that).
"""

from __future__ import annotations

import json
import shlex
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

from tests.baking import BakedImage
from tests.e2e.fleet import imagefactory

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

NODE = "vmo"

# node.env is written by cloud-init's init modules (in cloud-init-local for imagefactory's
# seeds, else in cloud-init.service); the agent needs it and the network.
NEEDED = {"cloud-init.service", "cloud-init-local.service", "network-online.target"}
NOT_NEEDED = {
    "cloud-config.service",
    "cloud-config.target",
    "cloud-final.service",
    "cloud-init.target",
    "multi-user.target",
}
ENABLED_SERVICES = {
    "cloud-config.service",
    "cloud-final.service",
    "cloud-init-local.service",
    "cloud-init.service",
    "executor.service",
    "fleetbake-ssh-keygen.service",
    "getty@.service",
    "ssh.service",
    "systemd-network-generator.service",
    "systemd-networkd-wait-online.service",
    "systemd-networkd.service",
    "systemd-pstore.service",
}
"""Every service the image enables; a new one must be added here on purpose."""

GUEST_SCRIPT = textwrap.dedent(
    """
    import json, subprocess
    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    def ordered_after(unit):  # nothing for a name systemctl refuses
        proc = subprocess.run(["systemctl", "show", "-p", "After", "--value", unit],
                              capture_output=True, text=True)
        return proc.stdout.split() if proc.returncode == 0 else []
    # systemd's own graph, walked from the agent; one call per unit, so that a name
    # systemctl refuses cannot hide the others.
    after, todo = {}, ["executor.service"]
    while todo:
        unit = todo.pop()
        if unit not in after:
            after[unit] = ordered_after(unit)
            todo.extend(after[unit])
    agent = dict(line.split("=", 1) for line in
                 out("systemctl", "show", "-p", "After", "-p", "Wants", "-p", "WantedBy",
                     "executor.service").splitlines() if "=" in line)
    enabled = out("systemctl", "list-unit-files", "--state=enabled", "--type=service",
                  "--no-legend", "--plain")
    status = subprocess.run(["cloud-init", "status", "--wait"], capture_output=True, text=True)
    nice = {unit: out("systemctl", "show", "-p", "Nice", "--value", unit).strip()
            for unit in ("cloud-config.service", "cloud-final.service", "executor.service")}
    def skipped(unit):
        return sorted(out("systemctl", "show", "-p", "ConditionResult", "-p", "ActiveState",
                          unit).split())
    stages = json.load(open("/run/cloud-init/status.json"))["v1"]
    print(json.dumps({
        "after": after,
        "agent": {k: v.split() for k, v in agent.items()},
        "enabled": sorted(line.split()[0] for line in enabled.splitlines() if line.split()),
        "cloud_init_status": status.stdout.strip().splitlines()[-1:],
        "nice": nice,
        "fsck_root": skipped("systemd-fsck-root.service"),
        "network_stage": skipped("cloud-init.service"),
        "stages_run": sorted(k for k, v in stages.items()
                             if isinstance(v, dict) and v.get("finished")),
        "hosts": out("getent", "hosts", out("hostname").strip()).split()[:1],
        # /run/initramfs is root's only (0700).
        "fsck_root_in_initramfs": subprocess.run(
            ["sudo", "-n", "test", "-e", "/run/initramfs/fsck-root"]).returncode == 0,
        "node_env": subprocess.run(["sudo", "-n", "test", "-s", "/etc/executor/node.env"]
                                   ).returncode == 0,
    }))
    """
)


def checked(*args: str, env: dict[str, str]) -> str:
    proc = imagefactory(*args, env=env)
    assert proc.returncode == 0, f"imagefactory {shlex.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def guest(
    baked_image: BakedImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    env = {"XDG_STATE_HOME": str(tmp_path_factory.mktemp("order") / "state")}
    try:
        checked(
            "boot", str(baked_image.image), "--node-id", NODE, "--on-complete", "none",
            "--wait", "ssh", "--keep", "--timeout", "540", env=env,
        )  # fmt: skip
        yield json.loads(
            checked("ssh", NODE, "--", "python3", "-c", shlex.quote(GUEST_SCRIPT), env=env)
        )
    finally:
        imagefactory("stop", "--all", env=env)


def ordered_after(after: dict[str, list[str]], unit: str) -> set[str]:
    """Every unit that `unit` is ordered after, directly or through others."""
    seen: set[str] = set()
    todo = [unit]
    while todo:
        for dep in after.get(todo.pop(), []):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_ordered_after_walks_the_whole_chain() -> None:
    after = {"a": ["b"], "b": ["c", "a"], "c": [], "d": ["a"]}
    assert ordered_after(after, "a") == {"a", "b", "c"}
    assert ordered_after(after, "c") == set()


def test_the_agent_waits_for_the_init_stage_and_the_network(guest: dict[str, Any]) -> None:
    assert {"cloud-init.service", "network-online.target"} <= set(guest["agent"]["After"])
    assert {"cloud-init.service", "network-online.target"} <= set(guest["agent"]["Wants"])
    assert NEEDED <= ordered_after(guest["after"], "executor.service")


def test_the_agent_waits_for_no_later_cloud_init_stage(guest: dict[str, Any]) -> None:
    waits_for = ordered_after(guest["after"], "executor.service")
    assert not waits_for & NOT_NEEDED, sorted(waits_for & NOT_NEEDED)
    assert not set(guest["agent"]["Wants"]) & NOT_NEEDED
    assert guest["agent"]["WantedBy"] == ["multi-user.target"]


def test_only_the_listed_services_are_enabled(guest: dict[str, Any]) -> None:
    assert set(guest["enabled"]) == ENABLED_SERVICES


def test_cloud_init_still_finishes_and_wrote_the_identity(guest: dict[str, Any]) -> None:
    """The later stages still run (off the agent's path), so `cloud-init status --wait`
    ends, and node.env came from the seed."""
    assert guest["cloud_init_status"] == ["status: done"]
    assert guest["node_env"] is True


def test_cloud_init_local_applied_the_seed_and_the_network_stage_was_skipped(
    guest: dict[str, Any],
) -> None:
    """The seed's `dsmode: local`: the init modules (node.env) ran before the network, and
    cloud-init.service, on the agent's path through sysinit.target, was skipped."""
    assert guest["network_stage"] == ["ActiveState=inactive", "ConditionResult=no"]
    assert guest["stages_run"] == ["init-local", "modules-config", "modules-final"]
    assert guest["hosts"] == ["127.0.1.1"]


def test_later_cloud_init_stages_run_niced_beside_the_agent(guest: dict[str, Any]) -> None:
    assert guest["nice"] == {
        "cloud-config.service": "10",
        "cloud-final.service": "10",
        "executor.service": "0",
    }


def test_the_initramfs_checked_the_root_and_systemd_skipped_its_own_check(
    guest: dict[str, Any],
) -> None:
    assert guest["fsck_root_in_initramfs"] is True
    assert guest["fsck_root"] == ["ActiveState=inactive", "ConditionResult=no"]
