"""The cloud-init NoCloud seed that turns a generic image into one fleet node.

    NodeVars (frozen) ──render_seed()──► Seed (user-data, meta-data, network-config text)
                                           └──write_iso()──► seed.iso, volume label "cidata"

The templates live in the repository's `cloud-init/` directory. Each placeholder is
replaced by a JSON value (JSON is YAML), so hostile values cannot break the documents.
The ISO is written with pycdlib: no external ISO tool is needed.
"""

from __future__ import annotations

import io
import json
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path

import pycdlib
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from executor.agent.config import MASTER_URL
from executor.files import write_output
from imagefactory import pki
from imagefactory.boot import nodeenv
from imagefactory.errors import die

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "cloud-init"
SEED_FILES = ("user-data", "meta-data", "network-config")
"""NoCloud reads these from the root of a volume labelled `cidata`."""
ON_COMPLETE = ("poweroff", "none")
NODE_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
OPS_USER = "ops"

# Variables set by dedicated options; `--env` may not override them.
_RESERVED = (
    "EXECUTOR_NODE_ID",
    "EXECUTOR_RUN_ID",
    "EXECUTOR_MASTER_URL",
    "EXECUTOR_TOKEN",
    "EXECUTOR_ON_COMPLETE",
)


@dataclass(frozen=True)
class HostKey:
    """An Ed25519 SSH host key made on the host, so that its public half can be pinned."""

    private: str
    """OpenSSH private key text."""
    public: str
    """`ssh-ed25519 AAAA...` line."""

    @classmethod
    def generate(cls) -> HostKey:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
        public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        return cls(private=private.decode("ascii"), public=public.decode("ascii"))


@dataclass(frozen=True)
class NodeVars:
    """Everything that makes a booted image one particular node."""

    node_id: str
    """The node's ID: EXECUTOR_NODE_ID, the hostname's source, part of the instance-id."""
    run_id: str | None = None
    """EXECUTOR_RUN_ID; None lets the agent generate (and persist) one."""
    master_url: str | None = None
    """EXECUTOR_MASTER_URL as the GUEST reaches it; None runs the agent standalone."""
    token: str | None = None
    """EXECUTOR_TOKEN, the node's bearer token."""
    on_complete: str = "poweroff"
    """EXECUTOR_ON_COMPLETE: `poweroff` ends the VM once the report is delivered."""
    extra_env: tuple[tuple[str, str], ...] = ()
    """Further node.env lines from `--env K=V`, in order."""
    ssh_keys: tuple[str, ...] = ()
    """Public keys authorized for the `ops` user; no key, no `ops` user."""
    host_key: HostKey | None = None
    """The node's SSH host key; None lets cloud-init generate the usual ones."""
    master_ca: str | None = None
    """EXECUTOR_MASTER_CA: the fleet CA certificates (PEM) the agent verifies an https://
    master with; node.env holds them on one line (the agent restores the PEM)."""
    insecure: bool = False
    """EXECUTOR_INSECURE=1: the plain http:// master is reached through a forward that
    never leaves the host (boot's guestfwd), not over a network."""

    def env(self) -> list[tuple[str, str]]:
        """The node.env pairs, validated, in a stable order."""
        check_node_id(self.node_id)
        if self.on_complete not in ON_COMPLETE:
            raise die(f"invalid on-complete action {self.on_complete!r}", hint="poweroff or none")
        if self.master_url is not None and not MASTER_URL.fullmatch(self.master_url):
            raise die(
                f"invalid master URL {self.master_url!r}",
                hint="an http:// or https:// URL as the guest reaches it, e.g. "
                "http://10.0.2.100:8750",
            )
        pairs = [("EXECUTOR_NODE_ID", self.node_id)]
        optional = (
            ("EXECUTOR_RUN_ID", self.run_id),
            ("EXECUTOR_MASTER_URL", self.master_url),
            ("EXECUTOR_TOKEN", self.token),
        )
        pairs += [(k, v) for k, v in optional if v is not None]
        if self.master_ca is not None:
            if not (self.master_url or "").startswith("https://"):
                raise die("--master-ca needs an https:// master URL")
            pairs.append(("EXECUTOR_MASTER_CA", pki.one_line(self.master_ca)))
        if self.insecure and not any(k == "EXECUTOR_INSECURE" for k, _ in self.extra_env):
            pairs.append(("EXECUTOR_INSECURE", "1"))
        pairs.append(("EXECUTOR_ON_COMPLETE", self.on_complete))
        for key, _ in self.extra_env:
            if key in _RESERVED:
                raise die(f"--env cannot set {key}", hint="use its own option, e.g. --node-id")
        return pairs + list(self.extra_env)


@dataclass(frozen=True)
class Seed:
    """The three NoCloud documents of one node."""

    instance_id: str
    hostname: str
    files: dict[str, str]
    """File name (user-data, meta-data, network-config) -> text."""


def check_node_id(node_id: str) -> str:
    """Node IDs go into URLs, hostnames and file names: keep them to a safe alphabet."""
    if not NODE_ID_RE.match(node_id):
        raise die(
            f"invalid node ID {node_id!r}",
            hint="1-63 characters: letters, digits, '.', '_', '-', starting with a letter or digit",
        )
    return node_id


def hostname_for(node_id: str) -> str:
    """A valid host name (RFC 1123 label) derived from the node ID."""
    label = re.sub(r"[^a-z0-9-]+", "-", node_id.lower()).strip("-")
    return label[:63].rstrip("-") or "node"


def _template(name: str) -> string.Template:
    path = TEMPLATE_DIR / name
    try:
        return string.Template(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise die(f"cannot read cloud-init template {path}: {exc.strerror}") from None


def _json(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)


def render_seed(node: NodeVars, instance_id: str | None = None) -> Seed:
    """Render the seed documents; a fresh instance-id unless one is given."""
    env_text = nodeenv.render(node.env())
    hostname = hostname_for(node.node_id)
    iid = instance_id or f"iid-{hostname}-{uuid.uuid4().hex}"
    ops = {
        "name": OPS_USER,
        "lock_passwd": True,
        "shell": "/bin/bash",
        "sudo": "ALL=(ALL) NOPASSWD:ALL",
        "ssh_authorized_keys": list(node.ssh_keys),
    }
    # An empty mapping (the schema refuses an empty list) replaces the image's
    # `users: [default]`, so no distro default account is created either.
    users: list[object] | dict[str, object] = [ops] if node.ssh_keys else {}
    public = {"node_id": node.node_id, "run_id": node.run_id, "master_url": node.master_url}
    host_keys: dict[str, str] = {}
    generate = ["rsa", "ecdsa", "ed25519"]  # cloud-init's default
    if node.host_key is not None:
        host_keys = {
            "ed25519_private": node.host_key.private,
            "ed25519_public": node.host_key.public,
        }
        generate = []  # the pinned key is the only one sshd offers
    values = {
        "user-data": {
            "node_env": _json(env_text),
            "users": _json(users),
            "ssh_keys": _json(host_keys),
            "ssh_genkeytypes": _json(generate),
        },
        "meta-data": {
            "instance_id": _json(iid),
            "hostname": _json(hostname),
            "executor": _json(public),
        },
        "network-config": {},
    }
    files = {name: _template(name).substitute(values[name]) for name in SEED_FILES}
    return Seed(instance_id=iid, hostname=hostname, files=files)


def read_ssh_key(path: Path) -> str:
    """One public key line from a file, checked to look like one."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise die(f"cannot read SSH public key {path}: {exc}") from None
    parts = text.split()
    if "\n" in text or len(parts) < 2 or not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        raise die(
            f"{path} does not hold one SSH public key",
            hint="give the .pub file, e.g. ~/.ssh/id_ed25519.pub",
        )
    return text


def iso_bytes(seed: Seed) -> bytes:
    """The NoCloud ISO image: ISO 9660 + Joliet + Rock Ridge, volume label `cidata`."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in seed.files.items():
        data = text.encode("utf-8")
        iso_name = "/" + name.replace("-", "").upper()[:8] + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def write_iso(seed: Seed, path: Path) -> None:
    """Write the seed ISO atomically (a partial file never carries the final name), readable
    by its owner only: it holds the node's token."""
    data = iso_bytes(seed)
    try:
        write_output(path, data, mode=0o600)
    except OSError as exc:
        raise die(f"cannot write {path}: {exc.strerror}") from None


def read_iso(path: Path) -> dict[str, str]:
    """The seed files of an ISO, by their Rock Ridge names (how tests look inside a seed)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        files: dict[str, str] = {}
        for name in SEED_FILES:
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, rr_path="/" + name)
            files[name] = buf.getvalue().decode("utf-8")
        return files
    finally:
        iso.close()
