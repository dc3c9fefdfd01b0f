"""Wait until every booted node meets the `--wait` condition, or time runs out.

    none       nothing to wait for (the nodes keep running)
    ssh        the node's SSH server answers through its port forward
    heartbeat  the master lists the node alive in its run (admin API), else the agent's
               `starting` status line appears on the console
    report     the master holds the node's report (admin API), else a final status line
               (succeeded, failed, ...) appears on the console
    poweroff   the VM has ended (the agent powers off after its report by default)

A VM that ends before its condition is met fails the wait at once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import click
import httpx

from imagefactory.boot import console, nodestate, ssh
from imagefactory.client import tls_verify
from imagefactory.errors import die

POLL_S = 1.0
TAIL_LINES = 15


class Machine(Protocol):
    def running(self) -> bool: ...

    def stop(self) -> None: ...


class BootTimeout(click.ClickException):
    """The wait condition was not met in time (exit 1; the message shows the consoles)."""

    exit_code = 1


class RunFailed(click.ClickException):
    """`--wait report` saw a run end other than succeeded (exit 1, like `executor run`)."""

    exit_code = 1


@dataclass
class BootedNode:
    """A node that has been started, and what its wait has seen."""

    record: nodestate.NodeRecord
    machine: Machine
    follower: console.ConsoleFollower
    started: float
    outcome: str | None = None
    """What ended the wait for this node, e.g. `report (succeeded)`."""
    elapsed_s: float | None = None
    run_status: str | None = None
    """The status of the node's run once `--wait report` has seen it (succeeded, ...)."""

    def summary(self) -> dict[str, Any]:
        last = self.follower.last
        return {
            **dataclasses.asdict(self.record),
            "outcome": self.outcome,
            "agent_state": last.state if last else None,
            "run_status": self.run_status,
            "elapsed_s": None if self.elapsed_s is None else round(self.elapsed_s, 1),
        }


def listed_alive(nodes: list[dict[str, Any]], node_id: str, run_id: str) -> bool:
    """Whether `GET /v1/nodes` lists the node alive in this run: the same node id may still
    be listed alive (3 intervals) after a heartbeat of the node it replaced."""
    return any(
        n.get("node_id") == node_id and n.get("run_id") == run_id and n.get("alive") for n in nodes
    )


class MasterApi:
    """The two admin endpoints that tell whether a node heartbeats or has reported."""

    def __init__(self, url: str, admin_token: str, *, insecure: bool = False) -> None:
        self.client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=5,
            # $IMAGEFACTORY_CA (boot sets it from --master-ca); `insecure`: plain http://
            verify=tls_verify(url, insecure=insecure),
        )

    def _get(self, path: str) -> httpx.Response | None:
        try:
            response = self.client.get(path)
        except httpx.HTTPError:
            return None  # master not up (yet): keep waiting
        if response.status_code in (401, 403):
            raise die(f"the master refused the admin token ({response.status_code})")
        return response

    def alive(self, node_id: str, run_id: str) -> bool:
        """Whether the master lists the node alive in this run (`listed_alive`)."""
        response = self._get("/v1/nodes")
        if response is None or response.status_code != 200:
            return False
        return listed_alive(response.json(), node_id, run_id)

    def run_status(self, run_id: str) -> str | None:
        """The status in the run's stored report; None while there is none."""
        response = self._get(f"/v1/runs/{run_id}")
        if response is None or response.status_code != 200:
            return None
        status = response.json().get("status")
        return status if isinstance(status, str) else "unknown"


def met(wait: str, node: BootedNode, api: MasterApi | None) -> str | None:
    """The outcome if the node now meets the wait condition, else None."""
    node.follower.poll()
    last = node.follower.last
    if wait == "none":
        return "started"
    if wait == "ssh":
        return "ssh up" if ssh.banner_ready(node.record.ssh_port) else None
    if wait == "heartbeat":
        if api is not None:
            alive = api.alive(node.record.node_id, node.record.run_id)
            return "heartbeat" if alive else None
        return "agent started" if last is not None else None
    if wait == "report":
        if api is not None:
            node.run_status = api.run_status(node.record.run_id)
        elif last is not None and last.final:
            node.run_status = last.state
        return None if node.run_status is None else f"report ({node.run_status})"
    return "powered off" if not node.machine.running() else None


def check_runs(nodes: list[BootedNode]) -> None:
    """Raise RunFailed naming every node whose reported run did not succeed."""
    failed = [f"{n.record.node_id} ({n.run_status})" for n in nodes if n.run_status != "succeeded"]
    if failed:
        raise RunFailed(f"the run did not succeed on node(s): {', '.join(failed)}")


def last_lines(node: BootedNode) -> str:
    lines = console.tail(node.follower.path, TAIL_LINES)
    body = "\n".join(f"  | {line}" for line in lines) or "  | (console is empty)"
    return f"last console lines of node {node.record.node_id}:\n{body}"


def wait_for(
    wait: str,
    timeout_s: float,
    nodes: list[BootedNode],
    progress: Callable[[str], None],
    api: MasterApi | None = None,
) -> None:
    """Block until all nodes meet the condition; raise with console tails otherwise."""
    deadline = time.monotonic() + timeout_s
    pending = list(nodes)
    while pending:
        for node in list(pending):
            # Ask whether the VM runs before checking the condition: a VM that
            # meets it and then ends between the two checks (a node powering
            # off after its report) must not read as one that ended before it.
            was_running = node.machine.running()
            outcome = met(wait, node, api)
            if outcome is not None:
                node.outcome = outcome
                node.elapsed_s = time.monotonic() - node.started
                pending.remove(node)
                progress(f"node {node.record.node_id}: {outcome} after {node.elapsed_s:.0f} s")
            elif not was_running:
                raise BootTimeout(
                    f"node {node.record.node_id} stopped before '{wait}'\n" + last_lines(node)
                )
        if pending and time.monotonic() > deadline:
            tails = "\n".join(last_lines(n) for n in pending)
            names = ", ".join(n.record.node_id for n in pending)
            raise BootTimeout(
                f"timed out after {timeout_s:.0f} s waiting for '{wait}' on {names}\n" + tails
            )
        if pending:
            time.sleep(POLL_S)
