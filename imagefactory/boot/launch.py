"""Boot nodes from one image: the steps behind `imagefactory boot`.

    BootPlan + NodeVars per node
      ─► prepare_node(): state dir, per-boot SSH key, seed ISO, qcow2 overlay, UEFI vars
      ─► start (qemu.start or libvirt_backend.start) ─► node.json for `ssh` and `stop`
      ─► wait_for(): EXECUTOR-STATUS lines on the console, the master's admin API,
         the SSH banner, or QEMU's exit
      ─► cleanup (always, unless kept): stop the VM, delete overlay, seed, key and vars

The image is only ever a read-only backing file. Console and QEMU logs stay in the
node's state directory after cleanup, for a look at what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from imagefactory.boot import console, libvirt_backend, nodestate, qemu, seed
from imagefactory.boot.waiting import BootedNode, Machine, MasterApi, wait_for
from imagefactory.errors import die
from imagefactory.targets import Target

WAITS = ("none", "ssh", "heartbeat", "report", "poweroff", "exit")
"""`exit` is `poweroff` in a container's words: the node has ended."""
BACKENDS = ("qemu", "libvirt")
KEPT_FILES = ("console.log", "qemu.log", "state")
"""What cleanup leaves in a node's state directory (`state`: a container node's agent
state directory, with its results and combined log)."""


@dataclass(frozen=True)
class BootPlan:
    """The resolved, validated settings of one `boot` invocation."""

    image: Path
    target: Target
    backend: str
    accel: str
    wait: str
    timeout_s: float
    keep: bool
    master_url: str | None = None
    """The master as the host sees it (loopback only)."""
    admin_token: str | None = None
    """Lets `--wait heartbeat|report` ask the master instead of reading consoles."""
    memory_mib: int = 1024
    cpus: int = 2

    @property
    def keeps_nodes(self) -> bool:
        """The nodes outlive this command: `--keep`, or `--wait none` (nothing to wait
        for before cleaning up; `imagefactory stop` ends them)."""
        return self.keep or self.wait == "none"


def node_ids(base: str, count: int) -> list[str]:
    """`--count K` boots `base-1..base-K`; a single node keeps its ID."""
    if count < 1:
        raise die("--count must be at least 1")
    return [base] if count == 1 else [f"{base}-{i}" for i in range(1, count + 1)]


def find_image(path: Path) -> Path:
    """The image file itself, also when given the directory a bake wrote."""
    if path.is_dir():
        found = sorted(path.glob("*.qcow2"))
        if len(found) != 1:
            raise die(f"{path} holds {len(found)} .qcow2 images", hint="give the image file")
        return found[0]
    if not path.is_file():
        raise die(f"image {path} does not exist")
    return path


def claim_workdir(node_id: str) -> Path:
    """A fresh state directory for the node; refuses to touch a node still running."""
    workdir = nodestate.node_dir(node_id)
    if (workdir / nodestate.RECORD).exists():
        old = nodestate.load(node_id)
        if is_alive(old):
            raise die(
                f"node {node_id} is already running",
                hint=f"stop it with `imagefactory stop {node_id}`",
            )
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True, mode=0o700)
    return workdir


@dataclass(frozen=True)
class PreparedNode:
    """A node's files, ready to start; its SSH port is known only once QEMU runs."""

    config: qemu.VmConfig
    record: nodestate.NodeRecord
    host_key: str
    """The public SSH host key the seed gives the guest, pinned once the port is known."""


def prepare_node(plan: BootPlan, node: seed.NodeVars) -> PreparedNode:
    """Write everything one node boots from into its state directory."""
    workdir = claim_workdir(node.node_id)
    try:
        return _prepare_files(plan, node, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)  # nothing of a node that never started
        raise


def _prepare_files(plan: BootPlan, node: seed.NodeVars, workdir: Path) -> PreparedNode:
    key_file, public_key = nodestate.make_ssh_key(workdir, f"fleetbake-{node.node_id}")
    host_key = seed.HostKey.generate()
    node = dataclasses.replace(node, ssh_keys=(public_key, *node.ssh_keys), host_key=host_key)
    made = seed.render_seed(node)
    seed.write_iso(made, workdir / "seed.iso")
    qemu.create_overlay(plan.image, workdir / "overlay.qcow2")
    config = qemu.VmConfig(
        name=f"fleetbake-{node.node_id}",
        target=plan.target,
        accel=plan.accel,
        disk=workdir / "overlay.qcow2",
        seed=workdir / "seed.iso",
        console_log=workdir / "console.log",
        ssh_port=0,  # QEMU binds a free port: one picked here could be taken before that
        master=qemu.master_forward(plan.master_url) if plan.master_url else None,
        firmware=uefi_vars(plan.target, workdir),
        memory_mib=plan.memory_mib,
        cpus=plan.cpus,
    )
    record = nodestate.NodeRecord(
        node_id=node.node_id,
        run_id=node.run_id or "",
        instance_id=made.instance_id,
        backend=plan.backend,
        ssh_port=0,  # known once QEMU runs
        ssh_user=seed.OPS_USER,
        ssh_key=str(key_file),
        workdir=str(workdir),
        console_log=str(config.console_log),
    )
    return PreparedNode(config, record, host_key.public)


def uefi_vars(target: Target, workdir: Path) -> qemu.PflashPair | None:
    """UEFI code plus a private copy of the variable store, for UEFI targets."""
    if target.firmware != "uefi":
        return None
    from imagefactory.host.firmware import find_uefi

    found = find_uefi(target.arch)
    if found is None:
        raise die(
            f"no UEFI firmware for {target.arch}",
            hint=f"install {target.firmware_package} (scripts/setup-host.sh)",
        )
    vars_copy = workdir / "vars.fd"
    shutil.copyfile(found.vars_template, vars_copy)
    return qemu.PflashPair(code=found.code, vars=vars_copy)


def start_node(plan: BootPlan, prepared: PreparedNode) -> BootedNode:
    """Start the VM, then record where its SSH is (node.json, known_hosts)."""
    config, record = prepared.config, prepared.record
    workdir = Path(record.workdir)
    machine: qemu.QemuMachine | libvirt_backend.LibvirtMachine
    if plan.backend == "libvirt":
        machine = libvirt_backend.start(config)
        record = dataclasses.replace(record, domain=config.name)
    else:
        # A node that is not kept must not outlive this process, even if it is killed.
        machine = qemu.start(config, workdir / "qemu.log", die_with_parent=not plan.keeps_nodes)
        record = dataclasses.replace(record, pid=machine.pid)
    try:
        record = dataclasses.replace(record, ssh_port=machine.ssh_port())
        nodestate.pin_host_key(workdir, record.ssh_port, prepared.host_key)
        nodestate.save(record)
    except BaseException:
        machine.stop()  # the caller's cleanup has only the record from before the start
        raise
    return BootedNode(
        record, machine, console.ConsoleFollower(config.console_log), time.monotonic()
    )


def is_alive(record: nodestate.NodeRecord) -> bool:
    return machine_of(record).running()


class _RecordedQemu:
    """A QEMU started by an earlier `imagefactory boot`, known only by its pid."""

    def __init__(self, pid: int, name: str) -> None:
        self.pid, self.name = pid, name

    def running(self) -> bool:
        return nodestate.qemu_alive(self.pid, self.name)

    def stop(self) -> None:
        for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 30.0)):
            if not self.running():
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + grace_s
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.2)


def machine_of(record: nodestate.NodeRecord) -> Machine:
    """The handle of a recorded node's VM, for `stop` and liveness checks."""
    name = f"fleetbake-{record.node_id}"
    from imagefactory.boot.container import RUNTIMES, ContainerMachine

    if record.backend in RUNTIMES:
        return ContainerMachine(record)
    if record.backend == "libvirt":
        return libvirt_backend.LibvirtMachine(libvirt_backend.open_connection(), name)
    return _RecordedQemu(record.pid or 0, name)


def cleanup(record: nodestate.NodeRecord, machine: Machine) -> None:
    """Stop the VM or container and delete all but its logs (idempotent)."""
    machine.stop()
    workdir = Path(record.workdir)
    if workdir.is_dir():
        for path in workdir.iterdir():
            if path.name in KEPT_FILES:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so `finally` blocks clean up in both cases."""

    def interrupt(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def boot(
    plan: BootPlan, nodes: list[seed.NodeVars], progress: Callable[[str], None]
) -> list[BootedNode]:
    """Boot all nodes, wait for the condition, and clean up unless the plan keeps them."""
    keep = plan.keeps_nodes
    api = None
    if plan.admin_token and plan.master_url and plan.wait in ("heartbeat", "report"):
        api = MasterApi(plan.master_url, plan.admin_token)
    booted: list[BootedNode] = []
    with sigterm_as_interrupt():
        try:
            for node in nodes:
                prepared = prepare_node(plan, node)
                try:
                    started = start_node(plan, prepared)
                except BaseException:
                    cleanup(prepared.record, machine_of(prepared.record))
                    raise
                booted.append(started)
                progress(
                    f"node {node.node_id}: booting ({plan.backend}, {plan.accel}, "
                    f"ssh 127.0.0.1:{started.record.ssh_port}, "
                    f"console {prepared.config.console_log})"
                )
            wait_for(plan.wait, plan.timeout_s, booted, progress, api)
        finally:
            if not keep:
                cleanup_all(booted, progress)
    return booted


def cleanup_all(booted: list[BootedNode], progress: Callable[[str], None]) -> None:
    """Clean up every node, even after one of them failed to stop (the first such error is
    raised at the end). Ctrl-C or SIGTERM meanwhile waits for the end: a second Ctrl-C
    used to abort this and leave VMs and containers running (runc may take 30 s each). If
    nothing else is on its way out, the interrupt is raised once all are stopped."""
    pending: list[int] = []

    def later(signum: int, _frame: FrameType | None) -> None:
        if not pending:
            progress("stopping the nodes first (this cannot be interrupted)")
        pending.append(signum)

    failed: Exception | None = None
    previous = {sig: signal.signal(sig, later) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for node in booted:
            try:
                cleanup(node.record, node.machine)
            except Exception as exc:  # the others must still be stopped
                progress(f"node {node.record.node_id}: cannot clean up: {exc}")
                failed = failed or exc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if sys.exc_info()[1] is not None:  # in a `finally`: an exception is already on its way
        return
    if failed is not None:
        raise failed
    if pending:
        raise KeyboardInterrupt
