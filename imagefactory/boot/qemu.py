"""QEMU command lines for booting a node, built by pure functions from the target table,
and the few impure steps around them (overlay creation, starting and stopping QEMU).

    Target row + accelerator + NodeDisks + forwards ──qemu_argv()──► argv
    image ──overlay_argv()──► `qemu-img create` of a qcow2 overlay backed by the image

The guest gets user-mode networking with `restrict=on`: it can reach nothing but
what is forwarded. `hostfwd` carries SSH from 127.0.0.1:<port> (port 0: QEMU binds a
free one, and says which in `info usernet`); `guestfwd` maps
GUEST_MASTER_IP:<port> to the master on the host's loopback, through a relay process
that QEMU starts per connection (a chardev target would be one connection for the
VM's whole life, and would fail if the master is not up when QEMU starts). The relay is
the project's own (`imagefactory.boot.relay`) where QEMU runs beside imagefactory, or
`socat` on a libvirt hypervisor that has only Debian's packages (imagefactory.deploy).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from imagefactory.boot import qmp
from imagefactory.errors import HostError, die
from imagefactory.run import CommandError, run, spawn
from imagefactory.targets import Target

GUEST_MASTER_IP = "10.0.2.100"
"""Where the guest reaches the master: an address inside QEMU's user network 10.0.2.0/24."""
GUEST_SSH_PORT = 22
RELAYS = ("imagefactory", "socat")
"""guestfwd relays: the project's Python relay, or socat (what a bare hypervisor has)."""
SOCAT_LINGER_S = 30
"""After one side of a relayed connection ends, how long socat waits for the other."""
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?\Z")
_SSH_FORWARD = re.compile(  # a row of `info usernet`: ... 127.0.0.1 <port> 10.0.2.15 22 ...
    rf"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+{GUEST_SSH_PORT}\b"
)
MONITOR_TIMEOUT_S = 60.0
"""How long QEMU may take to answer on its monitor at start (TCG on a loaded host)."""


@dataclass(frozen=True)
class MasterForward:
    """The master as the host sees it, and the URL the guest must use for it."""

    host: str
    port: int
    guest_url: str
    relay: str = "imagefactory"
    """Which program QEMU runs per guest connection: one of RELAYS."""

    @property
    def on_loopback(self) -> bool:
        """The forward never leaves the machine QEMU runs on."""
        return _is_loopback(self.host)


@dataclass(frozen=True)
class PflashPair:
    """UEFI pflash pair of one VM: shared read-only code, per-VM copy of the variables."""

    code: Path
    vars: Path


@dataclass(frozen=True)
class VmConfig:
    """Everything one QEMU process needs; derived, never edited."""

    name: str
    """A name for `-name` and process listings, e.g. `fleetbake-n-1`."""
    target: Target
    accel: str
    """`kvm` or `tcg`, as picked by imagefactory.host.accel."""
    disk: Path
    """The node's qcow2 overlay (the image itself is its read-only backing file)."""
    seed: Path
    """The NoCloud seed ISO, attached as a CD-ROM."""
    console_log: Path
    """Where the serial console is written."""
    ssh_port: int
    """Host port on 127.0.0.1 forwarded to the guest's port 22; 0: QEMU picks a free one
    (`QemuMachine.ssh_port`, `libvirt_backend.ssh_forward_port`)."""
    master: MasterForward | None = None
    firmware: PflashPair | None = None
    memory_mib: int = 1024
    cpus: int = 2


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def master_forward(
    url: str, *, relay: str = "imagefactory", loopback_only: bool = True
) -> MasterForward:
    """Check a host-side master URL and derive the URL the guest uses for it.

    By default only loopback masters are accepted: the forward connects to the host's
    loopback, and nothing may leave the host (`imagefactory boot`). A libvirt hypervisor
    that deploy reaches may legitimately reach the master over its network
    (`loopback_only=False`); the host must then be a plain name or address, since it
    becomes part of the relay's command line.
    """
    if relay not in RELAYS:
        raise ValueError(f"unknown relay {relay!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise die(f"invalid master URL {url!r}", hint="e.g. http://127.0.0.1:8080")
    host = "127.0.0.1" if parts.hostname == "localhost" else parts.hostname
    if loopback_only and not _is_loopback(host):
        raise die(
            f"master {parts.hostname} is not on this host's loopback",
            hint="guests may only reach the master through a forward to 127.0.0.1",
        )
    if not (_is_address(host) or _HOST_NAME.match(host)):
        raise die(f"invalid host {parts.hostname!r} in master URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise die(f"invalid port in master URL {url!r}") from None
    netloc = f"{GUEST_MASTER_IP}:{port}"
    guest_url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return MasterForward(host=host, port=port, guest_url=guest_url, relay=relay)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _opt(value: str | Path) -> str:
    """Escape a value inside a QEMU `key=value,...` option (commas are doubled)."""
    return str(value).replace(",", ",,")


def relay_command(forward: MasterForward) -> str:
    """The per-connection command of the guestfwd rule (QEMU splits it like a shell)."""
    host, port = forward.host, str(forward.port)
    if forward.relay == "socat":
        address = f"TCP6:[{host}]:{port}" if ":" in host else f"TCP:{host}:{port}"
        return shlex.join(["socat", "-t", str(SOCAT_LINGER_S), "STDIO", address])
    return shlex.join([sys.executable, "-m", "imagefactory.boot.relay", host, port])


def netdev_arg(config: VmConfig) -> str:
    """The isolated user-mode network: SSH in, the master out, nothing else."""
    rules = [
        "user",
        "id=net0",
        "restrict=on",
        f"hostfwd=tcp:127.0.0.1:{config.ssh_port}-:{GUEST_SSH_PORT}",
    ]
    if config.master is not None:
        m = config.master
        cmd = relay_command(m)
        rules.append(f"guestfwd=tcp:{GUEST_MASTER_IP}:{m.port}-cmd:{_opt(cmd)}")
    return ",".join(rules)


def cpu_for(target: Target, accel: str) -> str:
    return target.cpu_kvm if accel == "kvm" else target.cpu_tcg


def firmware_args(firmware: PflashPair | None) -> list[str]:
    """UEFI as two pflash drives; nothing for SeaBIOS, QEMU's default on x86_64."""
    if firmware is None:
        return []
    return [
        "-drive",
        f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(firmware.code)}",
        "-drive",
        f"if=pflash,format=raw,unit=1,file={_opt(firmware.vars)}",
    ]


def forwarded_ssh_port(usernet: str) -> int | None:
    """The host port of the SSH forward in the text of QEMU's `info usernet`."""
    match = _SSH_FORWARD.search(usernet)
    return int(match[1]) if match else None


def qemu_argv(config: VmConfig, monitor_fd: int | None = None) -> list[str]:
    """The full QEMU command line of one node; `monitor_fd`: a QMP monitor on that
    inherited socket (imagefactory.boot.qmp)."""
    t = config.target
    return [
        t.qemu_binary,
        "-name",
        config.name,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        # A guest reboot ends QEMU, like a poweroff: a node runs once.
        "-no-reboot",
        "-machine",
        t.machine,
        "-accel",
        config.accel,
        "-cpu",
        cpu_for(t, config.accel),
        "-m",
        str(config.memory_mib),
        "-smp",
        str(config.cpus),
        *firmware_args(config.firmware),
        *t.extra_qemu_args,
        "-drive",
        f"if=none,id=disk0,format=qcow2,discard=unmap,file={_opt(config.disk)}",
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
        # virtio-scsi CD-ROM: one way that works on every machine type (q35 and virt).
        "-drive",
        f"if=none,id=seed0,format=raw,media=cdrom,readonly=on,file={_opt(config.seed)}",
        "-device",
        "virtio-scsi-pci,id=scsi0",
        "-device",
        "scsi-cd,bus=scsi0.0,drive=seed0",
        "-netdev",
        netdev_arg(config),
        "-device",
        "virtio-net-pci,netdev=net0",
        # Entropy for first-boot SSH host key generation.
        "-device",
        "virtio-rng-pci",
        "-chardev",
        f"file,id=console0,path={_opt(config.console_log)}",
        "-serial",
        "chardev:console0",
        *(qmp.monitor_argv(monitor_fd) if monitor_fd is not None else []),
    ]


def overlay_argv(image: Path, image_format: str, overlay: Path) -> list[str]:
    """`qemu-img create` of a qcow2 overlay whose backing file is `image` (never written)."""
    return [
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        image_format,
        "-b",
        str(image.resolve()),
        str(overlay),
    ]


def image_info_argv(image: Path) -> list[str]:
    return ["qemu-img", "info", "--output=json", str(image)]


def create_overlay(image: Path, overlay: Path) -> None:
    """Create the node's overlay; the image must be a disk image QEMU can read."""
    try:
        info = json.loads(run(image_info_argv(image)).stdout)
    except CommandError as exc:
        raise die(f"{image} is not a disk image QEMU can read: {exc}") from None
    run(overlay_argv(image, str(info["format"]), overlay))


class QemuMachine:
    """A running QEMU process (in its own process group); stop() is idempotent."""

    def __init__(
        self, proc: subprocess.Popen[bytes], name: str, monitor: qmp.Monitor, log: Path
    ) -> None:
        self.proc = proc
        self.name = name
        self.monitor = monitor
        self.log = log
        self._ssh_port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def ssh_port(self) -> int:
        """The host port QEMU bound for the guest's SSH (asked once, at start)."""
        if self._ssh_port is None:
            try:
                port = forwarded_ssh_port(self.monitor.human("info usernet"))
            except qmp.MonitorError as exc:
                raise HostError(f"QEMU of {self.name} failed at start: {self._why(exc)}") from None
            finally:
                self.monitor.close()  # nothing else is asked of this QEMU
            if port is None:
                raise HostError(f"QEMU of {self.name} reports no SSH forward")
            self._ssh_port = port
        return self._ssh_port

    def _why(self, exc: qmp.MonitorError) -> str:
        """QEMU's last message if it has exited, else what the monitor said."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)  # a monitor that is gone: QEMU is exiting
        if self.proc.returncode is None:
            return str(exc.message)
        with contextlib.suppress(OSError):
            lines = self.log.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1]
        return f"exit code {self.proc.returncode}, see {self.log}"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (QEMU exits cleanly), then SIGKILL after `grace_s`."""
        self.monitor.close()
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            if self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)


def start(config: VmConfig, log: Path, *, die_with_parent: bool = False) -> QemuMachine:
    """Start QEMU in the background, with a private monitor; its own messages go to `log`.
    `die_with_parent`: QEMU gets SIGTERM when this process dies, however it dies."""
    monitor = qmp.Monitor(MONITOR_TIMEOUT_S)
    try:
        fd = monitor.qemu_end.fileno()
        with log.open("wb") as out:
            proc = spawn(
                qemu_argv(config, monitor_fd=fd),
                stdout=out.fileno(),
                stderr=subprocess.STDOUT,
                die_with_parent=die_with_parent,
                pass_fds=(fd,),
            )
    except BaseException:
        monitor.close()
        raise
    monitor.qemu_end.close()  # QEMU has its own copy
    return QemuMachine(proc, config.name, monitor, log)
