"""Boot container nodes from a `bake --format oci` image: the container side of
`imagefactory boot DIR/T-oci --runtime runc`.

    ContainerPlan + NodeVars per node
      ─► unpack the image once (runc.unpack) ─► per node: state dir, network namespace
         with the master forward (netns.py, nsforward.py), bundle config.json
      ─► `runc run` ─► node.json for `stop`
      ─► wait_for(): EXECUTOR-STATUS lines in the container's output (console.log), the
         master's admin API, or the container's exit (boot/waiting.py, as for VMs)
      ─► cleanup (always, unless kept): SIGTERM (the run is cancelled and reported),
         remove the container, forwarder, namespace and bundle

The node's variables are the same as a VM's node.env (seed.NodeVars.env()); the master
is at the same http://127.0.0.1:PORT inside the container as on the host, and it is the
only address the container can reach. After cleanup, console.log and state/ (the agent's
state directory: results, combined log) stay in the node's directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imagefactory.boot import console, engines, launch, netns, nodestate, runc, seed
from imagefactory.boot.waiting import BootedNode, MasterApi, wait_for
from imagefactory.errors import die
from imagefactory.host.doctor import require_runtime
from imagefactory.run import spawn

RUNTIMES = ("runc", *engines.ENGINES)
STATE = "state"
"""The agent's state directory, in the node's directory (kept after cleanup)."""
_outliving: list[subprocess.Popen[bytes]] = []
"""Handles of processes this process started that no machine holds (the forwarders, and
the kept nodes' runc run): held until stop() reaps them, as a handle collected while its
process runs is a ResourceWarning, and a process never waited for stays a zombie."""


@dataclass(frozen=True)
class ContainerPlan:
    """The resolved settings of one `boot --runtime` invocation."""

    layout: Path
    runtime: str
    wait: str
    timeout_s: float
    keep: bool
    master_url: str | None = None
    """The master as the host sees it (loopback only)."""
    admin_token: str | None = None

    @property
    def keeps_nodes(self) -> bool:
        return self.keep or self.wait == "none"


def find_layout(path: Path) -> Path | None:
    """The OCI layout directory of a `bake --format oci` output, or None if `path` is
    not one (a VM image)."""
    if path.is_dir() and (path / "index.json").is_file() and (path / "oci-layout").is_file():
        return path
    return None


def master_inside(url: str) -> tuple[str, int, str]:
    """(host, port) of a loopback master as the host reaches it, and the URL the
    container uses: the same port on the container's own 127.0.0.1."""
    from imagefactory.boot.qemu import master_forward

    forward = master_forward(url)  # checks: http(s), loopback only
    parts = urlsplit(url)
    inside = urlunsplit(
        (parts.scheme, f"127.0.0.1:{forward.port}", parts.path, parts.query, parts.fragment)
    )
    return forward.host, forward.port, inside


class ContainerMachine:
    """A container node's handle: its container (`runc run` when started by this
    process; docker or podman by name), its forwarder and its network namespace.
    `proc` is the process whose end is the container's (runc) or that copies its
    output (`logs --follow`: docker, podman)."""

    def __init__(
        self, record: nodestate.NodeRecord, proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.record, self.proc = record, proc
        self.name = f"fleetbake-{record.node_id}"
        self.engine = record.backend if record.backend in engines.ENGINES else None

    def running(self) -> bool:
        if self.engine is not None:
            return engines.running(self.engine, self.name)
        if self.proc is not None:
            return self.proc.poll() is None
        return runc.state(self.name) in ("creating", "created", "running", "paused")

    def stop(self) -> None:
        if self.engine is not None:
            engines.stop(self.engine, self.name)
        else:
            runc.stop(self.name, self.running)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            if self.proc.poll() is None:
                self.proc.terminate()
        pid = self.record.forwarder_pid
        if pid and forwarder_alive(pid, self.name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if self.record.netns:
            netns.delete(self.record.netns)
        _release(self.record.pid, pid)


def _release(*pids: int | None) -> None:
    """Reap the held handles of these stopped processes (no zombies, no warnings)."""
    for proc in [p for p in _outliving if p.pid in pids]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.returncode is not None:
            _outliving.remove(proc)


def forwarder_alive(pid: int, name: str) -> bool:
    """True if `pid` is still this node's forwarder (not a reused process ID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"imagefactory.boot.nsforward" in cmdline and name.encode() in cmdline


def start_forwarder(
    ns: Path, host: str, port: int, name: str, log: Path, die_with_parent: bool
) -> int:
    listener = netns.listen_inside(ns, port)
    with listener, log.open("ab") as out:
        fd = listener.fileno()
        proc = spawn(
            [sys.executable, "-m", "imagefactory.boot.nsforward", str(fd), host, str(port), name],
            stdout=out.fileno(),
            stderr=subprocess.STDOUT,
            die_with_parent=die_with_parent,
            pass_fds=(fd,),
        )
    _outliving.append(proc)
    return proc.pid


@dataclass(frozen=True)
class Image:
    """What every container of one boot starts from."""

    user: tuple[int, int]
    """The image's uid and gid: the owner of each node's state directory."""
    bundle: Path | None = None
    """runc: the unpacked image (rootfs + umoci's config.json)."""
    name: str | None = None
    """docker, podman: the loaded image's name."""


@dataclass
class _Started:
    """The node's record as far as its start got: a failed start must stop what it made
    (a forwarder of kept nodes outlives boot, and nothing else would know its pid)."""

    record: nodestate.NodeRecord


def start_node(plan: ContainerPlan, image: Image, node: seed.NodeVars) -> BootedNode:
    workdir = launch.claim_workdir(node.node_id)
    name = f"fleetbake-{node.node_id}"
    record = nodestate.NodeRecord(
        node_id=node.node_id,
        run_id=node.run_id or "",
        instance_id=name,
        backend=plan.runtime,
        ssh_port=0,
        ssh_user="",
        ssh_key="",
        workdir=str(workdir),
        console_log=str(workdir / "console.log"),
        netns=netns.netns_name(node.node_id) if image.bundle is not None else None,
    )
    started = _Started(record)
    machine = None
    try:
        state = workdir / STATE
        state.mkdir(mode=0o700)
        os.chown(state, *image.user)
        if image.bundle is not None:
            record, proc = _start_runc(plan, image.bundle, node, started, state)
        else:
            assert image.name is not None
            record, proc = _start_engine(plan, image.name, node, started, state)
        machine = ContainerMachine(record, proc)
        nodestate.save(record)
        if plan.keeps_nodes:
            _outliving.append(proc)
    except BaseException:
        launch.cleanup(started.record, machine or ContainerMachine(started.record))
        raise
    follower = console.ConsoleFollower(Path(record.console_log))
    return BootedNode(record, machine, follower, time.monotonic())


def _forward(
    plan: ContainerPlan, ns: Path, started: _Started, node: seed.NodeVars
) -> seed.NodeVars:
    """The master forward into `ns` (its pid in `started`), and the node's variables with
    the inside URL."""
    if plan.master_url is None:
        return node
    host, port, inside = master_inside(plan.master_url)
    record = started.record
    log = Path(record.workdir) / "forward.log"
    pid = start_forwarder(ns, host, port, record.instance_id, log, not plan.keeps_nodes)
    started.record = dataclasses.replace(record, forwarder_pid=pid)
    return dataclasses.replace(node, master_url=inside)


def _start_runc(
    plan: ContainerPlan, bundle: Path, node: seed.NodeVars, started: _Started, state: Path
) -> tuple[nodestate.NodeRecord, subprocess.Popen[bytes]]:
    assert started.record.netns is not None
    ns = netns.create(started.record.netns)
    node = _forward(plan, ns, started, node)
    record = started.record
    spec = runc.ContainerSpec(
        record.instance_id, bundle / "rootfs", seed.hostname_for(node.node_id),
        tuple(node.env()), state, ns,
    )  # fmt: skip
    workdir = Path(record.workdir)
    runc.write_bundle(workdir / "bundle", bundle, spec)
    proc = runc.start(
        record.instance_id, workdir / "bundle", Path(record.console_log),
        die_with_parent=not plan.keeps_nodes,
    )  # fmt: skip
    started.record = dataclasses.replace(record, pid=proc.pid)
    return started.record, proc


def _start_engine(
    plan: ContainerPlan, image: str, node: seed.NodeVars, started: _Started, state: Path
) -> tuple[nodestate.NodeRecord, subprocess.Popen[bytes]]:
    record = started.record
    engine, name = plan.runtime, record.instance_id
    if plan.master_url is not None:  # the URL inside is known before the forward exists
        node = dataclasses.replace(node, master_url=master_inside(plan.master_url)[2])
    env_file = Path(record.workdir) / "node.env"
    engines.write_env_file(env_file, tuple(node.env()))
    engines.stop(engine, name)  # a stale one of an old boot
    hostname = seed.hostname_for(node.node_id)
    pid = engines.start(engine, engines.run_argv(engine, name, image, hostname, env_file, state))
    env_file.unlink()
    started.record = dataclasses.replace(record, pid=pid)
    logs = engines.follow_logs(engine, name, Path(record.console_log), not plan.keeps_nodes)
    if pid:
        _forward(plan, Path(f"/proc/{pid}/ns/net"), started, node)
    return started.record, logs


def prepare_image(plan: ContainerPlan, progress: Callable[[str], None]) -> Image:
    if plan.runtime in engines.ENGINES:
        progress(f"{plan.runtime} load of {plan.layout}")
        name = engines.load(plan.runtime, plan.layout)
        return Image(engines.image_user(plan.runtime, name), name=name)
    progress(f"unpacking {plan.layout} (once per image)")
    bundle = runc.unpack(plan.layout)
    return Image(runc.image_user(bundle), bundle=bundle)


def boot(
    plan: ContainerPlan, nodes: list[seed.NodeVars], progress: Callable[[str], None]
) -> list[BootedNode]:
    """Start all containers, wait for the condition, and clean up unless kept."""
    require_runtime(plan.runtime)
    if plan.wait == "ssh":
        raise die("container nodes have no SSH server", hint="wait for heartbeat or report")
    api = None
    if plan.admin_token and plan.master_url and plan.wait in ("heartbeat", "report"):
        api = MasterApi(plan.master_url, plan.admin_token)
    image = prepare_image(plan, progress)
    booted: list[BootedNode] = []
    with launch.sigterm_as_interrupt():
        try:
            for node in nodes:
                booted.append(start_node(plan, image, node))
                progress(
                    f"node {node.node_id}: started ({plan.runtime}, output "
                    f"{booted[-1].record.console_log})"
                )
            wait_for(plan.wait, plan.timeout_s, booted, progress, api)
        finally:
            if not plan.keeps_nodes:
                launch.cleanup_all(booted, progress)
    return booted
