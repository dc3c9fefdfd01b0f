"""SSH into a booted node with paramiko, retrying while its sshd comes up.

Host keys are never trusted on first use: `imagefactory boot` makes each node's host key,
hands it to the node in its seed, and pins its public half in the node's own known_hosts
file before the node starts; a connection that sees any other key is refused.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from imagefactory.boot.nodestate import NodeRecord
from imagefactory.errors import die

# Raised while the guest boots: port forward up but nothing listening, banner not yet
# sent, user not yet created by cloud-init.
_TRANSIENT = (
    OSError,
    EOFError,
    paramiko.SSHException,
)


class _UnknownHostKey(Exception):
    """No key is pinned for the address that answered (not retried, unlike SSHException)."""


class _PinnedOnly(paramiko.MissingHostKeyPolicy):
    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        raise _UnknownHostKey(hostname)


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, paramiko.BadHostKeyException)


@dataclass(frozen=True)
class Result:
    status: int
    stdout: bytes
    stderr: bytes


def _connect_once(node: NodeRecord, timeout: float) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    # `boot` pinned the node's host key before it started: any other key is refused.
    try:
        client.load_host_keys(str(node.known_hosts))
    except OSError as exc:
        raise die(f"no pinned host key for node {node.node_id}: {exc}") from None
    client.set_missing_host_key_policy(_PinnedOnly())
    try:
        client.connect(
            "127.0.0.1",
            port=node.ssh_port,
            username=node.ssh_user,
            key_filename=node.ssh_key,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            allow_agent=False,
            look_for_keys=False,
        )
    except BaseException:
        client.close()
        raise
    return client


def connect(node: NodeRecord, wait_s: float = 120.0) -> paramiko.SSHClient:
    """An authenticated connection, retried for up to `wait_s` seconds."""
    retrying = Retrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_delay(wait_s),
        wait=wait_fixed(2),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                return _connect_once(node, timeout=15)
    except (paramiko.BadHostKeyException, _UnknownHostKey):
        raise die(
            f"node {node.node_id} presents an SSH host key other than the one pinned at boot",
            hint=f"someone else answers on 127.0.0.1:{node.ssh_port}; see {node.known_hosts}",
        ) from None
    except _TRANSIENT as exc:
        raise die(
            f"cannot reach node {node.node_id} over SSH (127.0.0.1:{node.ssh_port}): {exc}",
            hint=f"is it up? see its console log {node.console_log}",
        ) from None
    raise AssertionError("unreachable")


def execute(client: paramiko.SSHClient, command: str, timeout: float | None = None) -> Result:
    """Run one command; collect its exit status and output."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read()
    err = stderr.read()
    return Result(stdout.channel.recv_exit_status(), out, err)


def password_login_refused(port: int, user: str, password: str = "password") -> bool:
    """True when the server at 127.0.0.1:port refuses a password login for `user`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=15)
        try:
            transport.auth_password(user, password)
        except (paramiko.BadAuthenticationType, paramiko.AuthenticationException):
            return True
        return not transport.is_authenticated()
    finally:
        transport.close()


def banner_ready(port: int, timeout: float = 5.0) -> bool:
    """True once an SSH server (not just the port forward) answers on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data and time.monotonic() < deadline:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(b"SSH-")
    except OSError:
        return False


def openssh_command(node: NodeRecord) -> list[str]:
    """The equivalent OpenSSH command line, for interactive use."""
    return [
        "ssh",
        "-p",
        str(node.ssh_port),
        "-i",
        node.ssh_key,
        "-o",
        f"UserKnownHostsFile={Path(node.known_hosts)}",
        "-o",
        "StrictHostKeyChecking=yes",
        f"{node.ssh_user}@127.0.0.1",
    ]
