"""One device over SSH (paramiko): connect with the host-key policy, upload files with
SFTP, run a command while streaming its output, follow the agent's journal.

A device that loses power or its network mid-install sends nothing, not even a reset, and
a plain read would wait for it forever. So the connection sends a keepalive every
KEEPALIVE_S, and the kernel drops it once data has gone unacknowledged for DEAD_PEER_S
(TCP_USER_TIMEOUT): every read on it then ends. A device that is up but whose command
prints nothing for IDLE_S (a hung install.sh) fails that step too.
"""

from __future__ import annotations

import io
import shlex
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import paramiko

from imagefactory.install.destination import Destination
from imagefactory.install.hostkeys import HostKeyPolicy, HostKeyRefused, fingerprint

CONNECT_TIMEOUT_S = 20.0
KEEPALIVE_S = 15
DEAD_PEER_S = 60
IDLE_S = 600.0


class RemoteError(Exception):
    """A step on the device failed; the message says which and why (one line)."""


def connect(
    dest: Destination, policy: HostKeyPolicy, identity_file: Path | None
) -> paramiko.SSHClient:
    """An authenticated connection. Without an identity file, the SSH agent and the
    usual ~/.ssh keys are tried, as `ssh` does."""
    client = paramiko.SSHClient()
    try:
        policy.prepare(client)
        client.connect(
            dest.host,
            port=dest.port,
            username=dest.user,
            key_filename=str(identity_file) if identity_file else None,
            allow_agent=identity_file is None,
            look_for_keys=identity_file is None,
            timeout=CONNECT_TIMEOUT_S,
            banner_timeout=CONNECT_TIMEOUT_S,
            auth_timeout=CONNECT_TIMEOUT_S,
        )
    except HostKeyRefused as exc:
        client.close()
        raise RemoteError(f"host key refused: {exc}") from None
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise RemoteError(
            f"host key of {dest.known_hosts_name} CHANGED: it is now {fingerprint(exc.key)}, "
            f"not the one in {policy.known_hosts}; refusing (remove the old line only if you "
            "know why it changed)"
        ) from None
    except paramiko.ssh_exception.NoValidConnectionsError as exc:
        client.close()
        why = "; ".join(
            sorted({getattr(e, "strerror", None) or str(e) for e in exc.errors.values()})
        )
        raise RemoteError(f"cannot connect to {dest}: {why}") from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise RemoteError(f"SSH login as {dest.user} refused: {exc}") from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        raise RemoteError(f"cannot connect to {dest}: {exc or type(exc).__name__}") from None
    transport = client.get_transport()
    assert transport is not None
    transport.set_keepalive(KEEPALIVE_S)
    sock = transport.sock
    if isinstance(sock, socket.socket):  # (not when a proxy command carries the session)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, DEAD_PEER_S * 1000)
    return client


def run_quiet(client: paramiko.SSHClient, command: str, timeout: float = 60.0) -> str:
    """Run a short command; its stdout, or RemoteError with its output."""
    try:
        _, stdout, stderr = client.exec_command(command, timeout=timeout)
        out = stdout.read().decode("utf-8", "replace")
        err = stderr.read().decode("utf-8", "replace")
    except TimeoutError:
        raise RemoteError(f"`{command}` gave no answer in {timeout:.0f} s") from None
    except (EOFError, OSError, paramiko.SSHException):
        _raise_if_lost(client)
        raise
    status = _exit_status(client, stdout.channel)
    if status != 0:
        detail = (err or out).strip().splitlines()
        raise RemoteError(
            f"`{command}` failed with exit code {status}" + (f": {detail[-1]}" if detail else "")
        )
    return out


def upload(client: paramiko.SSHClient, files: dict[str, tuple[bytes, int]]) -> None:
    """Write each remote path (its parent exists) with its mode, set before any data."""
    try:
        with client.open_sftp() as sftp:
            sftp.get_channel().settimeout(IDLE_S)  # type: ignore[union-attr]
            for path, (data, mode) in files.items():
                with sftp.open(path, "wb") as f:
                    f.chmod(mode)
                    f.set_pipelined(True)
                    f.write(data)
    except TimeoutError:
        raise RemoteError(f"the upload made no progress for {IDLE_S:.0f} s; gave up") from None
    except (EOFError, OSError, paramiko.SSHException):
        _raise_if_lost(client)
        raise


def run_streaming(
    client: paramiko.SSHClient,
    command: str,
    on_line: Callable[[str], None],
    idle_s: float = IDLE_S,
) -> int:
    """Run `command` (stderr merged into stdout), hand each output line to `on_line`
    as it comes, and return its exit status; RemoteError after `idle_s` without output."""
    channel = client.get_transport().open_session()  # type: ignore[union-attr]
    try:
        channel.set_combine_stderr(True)
        channel.settimeout(idle_s)
        channel.exec_command(command)
        reader = io.TextIOWrapper(
            io.BufferedReader(_ChannelRaw(channel)), encoding="utf-8", errors="replace"
        )
        try:
            for line in reader:
                on_line(line.rstrip("\n"))
        except TimeoutError:
            raise RemoteError(f"no output from the device for {idle_s:.0f} s; gave up") from None
        return _exit_status(client, channel)
    finally:
        channel.close()


def _exit_status(client: paramiko.SSHClient, channel: paramiko.Channel) -> int:
    """The command's exit status, once its output has ended; RemoteError when the output
    ended because the connection did."""
    status = channel.recv_exit_status()
    if status == -1:
        _raise_if_lost(client)
    return status


def _raise_if_lost(client: paramiko.SSHClient) -> None:
    """RemoteError if the connection is gone: the reason whatever failed had to fail."""
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        raise RemoteError("lost the connection to the device") from None


class _ChannelRaw(io.RawIOBase):
    """A channel's output as a raw stream, so lines can be read as they arrive."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.channel.recv(len(buffer))
        buffer[: len(data)] = data
        return len(data)


class JournalFollower:
    """`journalctl -f` of one invocation of a unit, appended to a local file as it
    comes (the file `boot`'s console follower reads for EXECUTOR-STATUS lines)."""

    def __init__(self, client: paramiko.SSHClient, sudo: str, unit: str, path: Path) -> None:
        self.path = path
        self.client = client
        invocation = run_quiet(
            client, f"{sudo}systemctl show --property=InvocationID --value {shlex.quote(unit)}"
        ).strip()
        match = f"_SYSTEMD_INVOCATION_ID={invocation}" if invocation else f"--unit={unit}"
        command = (
            f"{sudo}journalctl --no-pager --output=cat --follow --lines=all {shlex.quote(match)}"
        )
        self.channel = client.get_transport().open_session()  # type: ignore[union-attr]
        self.channel.set_combine_stderr(True)
        self.channel.exec_command(command)
        self.path.touch(mode=0o600)
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        with self.path.open("ab") as out:
            while True:
                data = self.channel.recv(65536)
                if not data:
                    return
                out.write(data)
                out.flush()

    def running(self) -> bool:
        """The device is reachable (the SSH session is up)."""
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def stop(self) -> None:
        self.channel.close()
        self._thread.join(timeout=5)
