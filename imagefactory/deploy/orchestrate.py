"""`deploy` and `undeploy` across devices, each device in its own thread:

    deploy:   device record ─► kind (first preferred that has a target) ─► environment
              (store, or a build now) ─► reserve the device on the master ─►
              transport.place ─► deployment record ─► wait (the admin API: heartbeat
              or report)
    undeploy: device record ─► its deployment ─► transport.remove ─► record cleared

A device that fails does not stop the others: its result says at which step and why.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from imagefactory.boot.seed import NodeVars
from imagefactory.boot.waiting import listed_alive
from imagefactory.client import AdminClient
from imagefactory.deploy.environment import environment_for
from imagefactory.deploy.transports import Placement, Transport
from imagefactory.errors import die
from imagefactory.kinds import KINDS, first_match
from imagefactory.targets import Target
from imagefactory.tokens import node_token

WAITS = ("none", "heartbeat", "report")
POLL_S = 1.0
MAX_DEVICE_PART = 56
"""Of a node id (at most 63 characters): the device's id, then `-` and 6 hex digits."""


class StepFailed(Exception):
    """A device's deployment stopped at a step (the message names the step and cause)."""


@dataclass(frozen=True)
class DeploySettings:
    pipeline: str
    """A pipeline published on the gateway: NAME or NAME@sha256:HEX."""
    master: str
    """The master's URL as the devices' hosts reach it (hypervisor, container host); a
    device's record may name its own (`master_url`)."""
    secret: str
    """The fleet secret: each node's token is derived from it and the node's id."""
    wait: str = "heartbeat"
    timeout_s: float = 900.0
    master_ca: str | None = None
    insecure: bool = False
    """EXECUTOR_INSECURE=1: the nodes may reach a plain http:// master over a network."""
    on_complete: str = "none"
    env: tuple[tuple[str, str], ...] = ()
    replace: bool = False
    """Undeploy what a device runs before deploying, instead of refusing."""


@dataclass
class DeviceResult:
    device: str
    status: str = "pending"
    """deployed (with its wait), undeployed, unchanged, or failed."""
    kind: str | None = None
    target: str | None = None
    environment: str | None = None
    node_id: str | None = None
    run_id: str | None = None
    wait: str | None = None
    """What the wait saw: `heartbeat`, `report (succeeded)`."""
    error: str | None = None
    elapsed_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "status": self.status,
            "kind": self.kind,
            "target": self.target,
            "environment": self.environment,
            "node_id": self.node_id,
            "run_id": self.run_id,
            "wait": self.wait,
            "error": self.error,
            "elapsed_s": round(self.elapsed_s, 1),
        }


def choose(device: dict[str, Any]) -> tuple[str, Target]:
    """The first kind in the device's preference list that has a target for its arch."""
    match = first_match(device["arch"], device["kinds"], [k.format for k in KINDS])
    if match is not None:
        return match[1].name, match[0]
    raise StepFailed(f"no target builds {'/'.join(device['kinds'])} for {device['arch']}")


def fresh_node(
    device_id: str, settings: DeploySettings, master_url: str, insecure: bool = False
) -> NodeVars:
    """A new node identity for the device: `DEVICE-<6 hex>`, a new run id, its token."""
    node_id = f"{device_id[:MAX_DEVICE_PART]}-{secrets.token_hex(3)}"
    return NodeVars(
        node_id=node_id,
        run_id=str(uuid.uuid4()),
        master_url=master_url,
        token=node_token(settings.secret, node_id),
        on_complete=settings.on_complete,
        extra_env=settings.env,
        master_ca=settings.master_ca,
        insecure=insecure,
    )


NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,55}-[0-9a-f]{6}")
"""The node ids deploy makes (fresh_node); a record naming another was not written by it."""


def check_record(device: dict[str, Any], deployment: dict[str, Any]) -> None:
    """What undeploy is about to remove must be what deploy made on this device: the
    record is stored on the master, and a tampered one must not make this host talk to
    another hypervisor (or run what its URI names) or remove another node's volumes."""
    if not NODE_ID.fullmatch(str(deployment.get("node_id"))):
        raise StepFailed(f"the deployment names node {deployment.get('node_id')!r}, "
                         "which deploy does not make")  # fmt: skip
    if deployment["kind"] == "vm":
        uri = deployment["details"].get("uri")
        if device["libvirt"] is None or uri != device["libvirt"]["uri"]:
            raise StepFailed(
                f"the deployment names hypervisor {uri!r}, not the device's: remove the "
                f"node there by hand, then `imagefactory undeploy --forget {device['id']}`"
            )


class Deployer:
    def __init__(
        self,
        client: AdminClient,
        transports: dict[str, Transport],
        progress: Callable[[str], None],
    ) -> None:
        self.client = client
        self.transports = transports
        self.progress = progress
        self.cancelled = threading.Event()
        """Set on Ctrl-C: builds and waits stop, what is in flight finishes its step."""

    def _each(
        self, device_ids: list[str], one: Callable[[DeviceResult, Callable[[str], None]], None]
    ) -> list[DeviceResult]:
        def run(device_id: str) -> DeviceResult:
            result = DeviceResult(device_id)
            started = time.monotonic()

            def say(text: str) -> None:
                self.progress(f"[{device_id}] {text}")

            try:
                one(result, say)
            except Exception as exc:  # noqa: BLE001 - one device's failure must not stop the rest
                result.status = "failed"
                result.error = str(getattr(exc, "message", None) or exc) or type(exc).__name__
                say(f"FAILED: {result.error}")
            result.elapsed_s = time.monotonic() - started
            return result

        with ThreadPoolExecutor(max_workers=min(16, len(device_ids))) as pool:
            futures = [pool.submit(run, d) for d in device_ids]
            while True:
                try:
                    return [f.result() for f in futures]
                except KeyboardInterrupt:
                    if self.cancelled.is_set():
                        raise  # a second Ctrl-C: leave now
                    self.cancelled.set()
                    self.progress(
                        "interrupted: finishing the steps in flight (Ctrl-C again to leave "
                        "at once, which may leave nodes unrecorded)"
                    )

    def check_known(self, device_ids: list[str]) -> None:
        """Refuse, before any work, device ids the inventory does not hold (also the one
        place an unreachable master or a refused token is reported)."""
        known = {d["id"] for d in self.client.get_json("/v1/devices")}
        if unknown := [d for d in device_ids if d not in known]:
            raise die(
                f"not in the inventory: {', '.join(unknown)}",
                hint="see `imagefactory devices list`; add with `imagefactory devices add`",
            )

    def deploy(self, device_ids: list[str], settings: DeploySettings) -> list[DeviceResult]:
        fresh_node("check", settings, settings.master).env()  # bad --master/--env: now, once
        return self._each(device_ids, lambda r, say: self._deploy(r, settings, say))

    def undeploy(self, device_ids: list[str], forget: bool = False) -> list[DeviceResult]:
        return self._each(device_ids, lambda r, say: self._undeploy(r, say, forget))

    def _device(self, device_id: str) -> dict[str, Any]:
        device: dict[str, Any] = self.client.get_json(f"/v1/devices/{device_id}")
        return device

    def _deploy(
        self, result: DeviceResult, settings: DeploySettings, say: Callable[[str], None]
    ) -> None:
        device = self._device(result.device)
        if device.get("deployment"):
            running = device["deployment"]["node_id"]
            if not settings.replace:
                raise StepFailed(
                    f"already runs node {running}: `imagefactory undeploy {result.device}` "
                    "first, or deploy --replace"
                )
            say(f"replacing node {running}")
            self._remove(device, say)
        kind, target = choose(device)
        result.kind, result.target = kind, target.name
        say(f"{kind} on {target.name}")
        env = environment_for(
            self.client, target.name, kind, settings.pipeline, say, self.cancelled
        )
        result.environment = env.digest
        master = device.get("master_url") or settings.master
        # --insecure: a plain http:// master reached over a network (the transports set
        # EXECUTOR_INSECURE themselves for a forward that stays on a host's loopback).
        node = fresh_node(result.device, settings, master, settings.insecure)
        result.node_id, result.run_id = node.node_id, node.run_id
        here = socket.gethostname()
        record = {
            "kind": kind,
            "target": target.name,
            "environment": env.digest,
            "node_id": node.node_id,
            "run_id": node.run_id,
            "details": {"placing_on": here},
        }
        # Reserve the device first: a deploy beside this one gets 409, not a second node.
        path = f"/v1/devices/{result.device}/deployment"
        self.client.put_json(f"{path}?if_undeployed=true", record)
        say(f"starting node {node.node_id} (run {node.run_id})")
        try:
            details = self.transports[kind].place(Placement(device, target, env, node), say)
        except BaseException:
            with contextlib.suppress(Exception):  # the transport cleaned up what it began
                self.client.delete(path)
            raise
        details = {**details, "placed_on": here}
        placed = {**record, "details": details}
        try:
            self.client.put_json(path, placed)
        except Exception as exc:
            say(f"could not record the deployment ({exc}); removing the node again")
            self.transports[kind].remove(device, placed, say)
            raise
        result.details = details
        result.status = "deployed"
        if settings.wait != "none":
            try:
                result.wait = self._wait(node, settings, say)
            except StepFailed:
                with contextlib.suppress(Exception):  # the reason must not be lost
                    for line in self.transports[kind].last_lines(details):
                        say(f"console: {line}")
                raise

    def _wait(self, node: NodeVars, settings: DeploySettings, say: Callable[[str], None]) -> str:
        """Poll the master (through the client, with its TLS settings) for the node."""
        assert node.run_id is not None
        say(f"waiting for the node's {settings.wait}")
        deadline = time.monotonic() + settings.timeout_s
        while time.monotonic() < deadline and not self.cancelled.is_set():
            report = self.client.poll_json(f"/v1/runs/{node.run_id}")
            if report is not None:
                status = str(report.get("status"))
                if settings.wait == "report" and status != "succeeded":
                    raise StepFailed(f"the run ended {status}")
                seen = f"report ({status})" if settings.wait == "report" else "heartbeat"
                say(seen)
                return seen
            if settings.wait == "heartbeat" and self._alive(node.node_id, node.run_id):
                say("heartbeat")
                return "heartbeat"
            time.sleep(POLL_S)
        if self.cancelled.is_set():
            raise StepFailed(f"interrupted while waiting; node {node.node_id} keeps running")
        raise StepFailed(
            f"no {settings.wait} from node {node.node_id} within {settings.timeout_s:.0f} s "
            f"(it keeps running: `imagefactory undeploy` removes it)"
        )

    def _alive(self, node_id: str, run_id: str) -> bool:
        return listed_alive(self.client.poll_json("/v1/nodes") or [], node_id, run_id)

    def _undeploy(self, result: DeviceResult, say: Callable[[str], None], forget: bool) -> None:
        device = self._device(result.device)
        deployment = device.get("deployment")
        if not deployment:
            result.status = "unchanged"
            say("nothing deployed")
            return
        result.kind, result.node_id = deployment["kind"], deployment["node_id"]
        result.environment, result.run_id = deployment["environment"], deployment["run_id"]
        if forget:
            self.client.delete(f"/v1/devices/{device['id']}/deployment")
            say(f"forgot node {deployment['node_id']}; nothing on the device was touched")
            result.status = "forgotten"
            return
        self._remove(device, say)
        result.status = "undeployed"

    def _remove(self, device: dict[str, Any], say: Callable[[str], None]) -> None:
        deployment = device["deployment"]
        details = deployment["details"]
        if "placed_on" not in details:
            raise StepFailed(
                f"node {deployment['node_id']} was being placed from {details.get('placing_on')} "
                "when that deploy stopped, and what it left is not recorded: check the device, "
                f"then `imagefactory undeploy --forget {device['id']}`"
            )
        check_record(device, deployment)
        placed_on, here = details["placed_on"], socket.gethostname()
        if self.transports[deployment["kind"]].local(device) and placed_on != here:
            raise StepFailed(
                f"node {deployment['node_id']} runs on {placed_on}, a local "
                f"{deployment['kind']} there: undeploy it on {placed_on}, not {here}"
            )
        say(f"removing node {deployment['node_id']} ({deployment['kind']})")
        self.transports[deployment["kind"]].remove(device, deployment, say)
        self.client.delete(f"/v1/devices/{device['id']}/deployment")
