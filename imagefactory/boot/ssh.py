"""SSH into a booted node with paramiko, retrying while its sshd comes up.

Host keys are trusted on first use and kept in the node's own known_hosts file: the
node is a VM this tool just booted behind a loopback port forward, and every later
connection must see the same key.
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


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, paramiko.BadHostKeyException)


@dataclass(frozen=True)
class Result:
    status: int
    stdout: bytes
    stderr: bytes


def _connect_once(node: NodeRecord, timeout: float) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    # A key already recorded must match (BadHostKeyException); the first one seen is
    # added and saved, since load_host_keys() also names the file to save to.
    node.known_hosts.touch(mode=0o600)
    client.load_host_keys(str(node.known_hosts))
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
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
    except paramiko.BadHostKeyException:
        raise die(
            f"node {node.node_id} presents a different SSH host key than before",
            hint=f"if the node was re-created, delete {node.known_hosts}",
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
        "StrictHostKeyChecking=accept-new",
        f"{node.ssh_user}@127.0.0.1",
    ]
