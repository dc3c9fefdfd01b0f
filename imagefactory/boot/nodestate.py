"""What `imagefactory boot` leaves behind for `imagefactory ssh` and `imagefactory stop`.

Every booted node has a directory `$XDG_STATE_HOME/imagefactory/nodes/<NODE>/`
(default `~/.local/state/imagefactory/nodes/<NODE>/`) with its overlay, seed, console
log, UEFI variables, a per-boot SSH key pair and `node.json`, which records how to reach
and stop the node. The directory disappears when the node is cleaned up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import paramiko

from executor.files import write_output
from imagefactory.errors import die
from imagefactory.paths import state_root

RECORD = "node.json"


@dataclass(frozen=True)
class NodeRecord:
    """One booted node, as written to node.json."""

    node_id: str
    run_id: str
    instance_id: str
    backend: str
    """`qemu` or `libvirt`; for a container node its runtime (`runc`, ...)."""
    ssh_port: int
    """The node's SSH server is at 127.0.0.1:ssh_port."""
    ssh_user: str
    ssh_key: str
    """Private key file authorized for ssh_user (generated per boot)."""
    workdir: str
    console_log: str
    pid: int | None = None
    """QEMU's process ID (qemu backend)."""
    domain: str | None = None
    """The libvirt domain name (libvirt backend)."""
    netns: str | None = None
    """A container node's network namespace (`ip netns` name)."""
    forwarder_pid: int | None = None
    """A container node's master forward process (boot/nsforward.py)."""

    @property
    def known_hosts(self) -> Path:
        """Host keys seen on first connection to this node (trust on first use)."""
        return Path(self.workdir) / "known_hosts"


def nodes_root() -> Path:
    return state_root() / "nodes"


def node_dir(node_id: str) -> Path:
    return nodes_root() / node_id


def save(record: NodeRecord) -> None:
    path = Path(record.workdir) / RECORD
    write_output(path, (json.dumps(asdict(record), indent=2) + "\n").encode("utf-8"), 0o600)


def load(node_id: str) -> NodeRecord:
    """The record of a booted node, or a user error saying how to boot one."""
    path = node_dir(node_id) / RECORD
    try:
        return NodeRecord(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise die(
            f"no booted node {node_id!r}",
            hint="boot it with `imagefactory boot IMAGE --node-id ... --keep` first",
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise die(f"cannot read {path}: {exc}") from None


def booted_nodes() -> list[str]:
    root = nodes_root()
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob(f"*/{RECORD}"))


def make_ssh_key(workdir: Path, comment: str) -> tuple[Path, str]:
    """A fresh key pair for this boot: (private key file, public key line)."""
    key = paramiko.ECDSAKey.generate(bits=256)
    path = workdir / "id_ecdsa"
    key.write_private_key_file(str(path))
    path.chmod(0o600)
    return path, f"{key.get_name()} {key.get_base64()} {comment}"


def pin_host_key(workdir: Path, ssh_port: int, public_key: str) -> None:
    """Trust exactly this host key for the node's forwarded SSH port (no first-use trust)."""
    line = f"[127.0.0.1]:{ssh_port} {public_key}\n"
    write_output(workdir / "known_hosts", line.encode("ascii"), mode=0o600)


def qemu_alive(pid: int, name: str) -> bool:
    """True if `pid` is still the QEMU of this node (not a reused process ID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return name.encode() in cmdline
