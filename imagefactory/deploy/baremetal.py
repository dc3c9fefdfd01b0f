"""A bare-metal device: its node is installed over SSH by the installer environment's
install.sh, the same path as `imagefactory install` (imagefactory/install/)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.boot.seed import NodeVars
from imagefactory.errors import UserError
from imagefactory.install.destination import parse_destination
from imagefactory.install.fleet import Fleet, Job, Outcome, node_job
from imagefactory.install.hostkeys import HostKeyPolicy, check_fingerprint


class InstallFailed(UserError):
    """install.sh did not succeed on the device (the message says why)."""


@dataclass(frozen=True)
class SshAccess:
    """How this host logs in to bare-metal devices (deploy's SSH options)."""

    known_hosts: Path
    identity_file: Path | None = None
    accept_new_host_key: bool = False


def _run(
    ssh: dict[str, Any], access: SshAccess, script: Path, job: Job, say: Callable[[str], None]
) -> Outcome:
    fingerprints = frozenset(check_fingerprint(f) for f in [ssh.get("host_key_fingerprint")] if f)
    policy = HostKeyPolicy(
        access.known_hosts.expanduser(), fingerprints, access.accept_new_host_key
    )
    [outcome] = Fleet(script, policy, access.identity_file, say).run([job])
    if outcome.status == "failed":
        raise InstallFailed(outcome.error or "install.sh failed")
    return outcome


def place_baremetal(
    ssh: dict[str, Any], access: SshAccess, script: Path, node: NodeVars,
    say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Install `node` on the device at `ssh["address"]` with `script` (install.sh); the
    details name the address and host key it was installed at, for remove_baremetal."""
    dest = parse_destination(ssh["address"])
    outcome = _run(ssh, access, script, node_job(dest, node.env()), say)
    return {
        "address": ssh["address"],
        "host_key_fingerprint": ssh.get("host_key_fingerprint") or "",
        "installed": outcome.status,
    }


def remove_baremetal(
    ssh: dict[str, Any], access: SshAccess, script: Path, say: Callable[[str], None]
) -> None:
    """Uninstall the node (package, unit, user, node.env; the agent's state is kept) at
    the address place_baremetal recorded, also when the device record changed since."""
    dest = parse_destination(ssh["address"])
    _run(ssh, access, script, Job(dest, None, ("--uninstall",)), say)
