"""Which SSH host keys `imagefactory install` trusts.

A key is trusted when the known_hosts file lists it for the host, or when its SHA256
fingerprint is one given with --host-key-fingerprint. A host the file does not list is
refused unless --accept-new-host-key is given; then its key is added to the file (as
OpenSSH's StrictHostKeyChecking=accept-new does). A key other than the one the file
lists is always refused: that is what a man in the middle looks like.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko


class HostKeyRefused(Exception):
    """The server's key is not trusted (the message says why and what to do)."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's `SHA256:...` form (unpadded base64 of the key blob's sha256)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def check_fingerprint(text: str) -> str:
    """`SHA256:` and 43 base64 characters, as `ssh-keygen -lf` prints it."""
    body = text.removeprefix("SHA256:")
    try:
        ok = text.startswith("SHA256:") and len(base64.b64decode(body + "=", validate=True)) == 32
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{text!r} is not a fingerprint like SHA256:uNiVz... (ssh-keygen -lf)")
    return text


_file_lock = threading.Lock()
"""Hosts connect in parallel: one writer of the known_hosts file at a time."""


@dataclass(frozen=True)
class HostKeyPolicy:
    known_hosts: Path
    fingerprints: frozenset[str] = frozenset()
    accept_new: bool = False

    def prepare(self, client: paramiko.SSHClient) -> None:
        """Load the known keys into `client` and set what happens to an unknown one."""
        if self.known_hosts.is_file():
            try:
                client.load_host_keys(str(self.known_hosts))
            except (OSError, paramiko.SSHException) as exc:
                raise HostKeyRefused(f"cannot read {self.known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(_Unknown(self))

    def remember(self, hostname: str, key: paramiko.PKey) -> None:
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        with _file_lock:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a", encoding="ascii") as f:
                f.write(line)


class _Unknown(paramiko.MissingHostKeyPolicy):
    def __init__(self, policy: HostKeyPolicy) -> None:
        self.policy = policy

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        seen = fingerprint(key)
        if seen in self.policy.fingerprints:
            return
        if self.policy.fingerprints:
            raise HostKeyRefused(
                f"host key {seen} of {hostname} is not the one given with --host-key-fingerprint"
            )
        if not self.policy.accept_new:
            raise HostKeyRefused(
                f"{hostname} is not in {self.policy.known_hosts} (its key is {key.get_name()} "
                f"{seen}); check it, then give --host-key-fingerprint {seen} or "
                "--accept-new-host-key"
            )
        self.policy.remember(hostname, key)
