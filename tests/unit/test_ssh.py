"""SSH into a node: a real paramiko server on loopback stands in for the guest's sshd."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import click
import paramiko
import pytest
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_SUCCEEDED

from imagefactory.boot import nodestate, ssh

HOST_KEY = paramiko.ECDSAKey.generate(bits=256)


class Guest(paramiko.ServerInterface):
    """Accepts one public key for `ops`, refuses passwords, runs two fake commands."""

    def __init__(self, allowed: paramiko.PKey) -> None:
        self.allowed = allowed
        self.command = b""
        self.ready = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "ops" and key.get_base64() == self.allowed.get_base64()
        return AUTH_SUCCESSFUL if ok else AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.command = command
        self.ready.set()
        return True


def handle(conn: socket.socket, allowed: paramiko.PKey) -> None:
    """One SSH session; like sshd, a broken client never takes the server down."""
    transport = paramiko.Transport(conn)
    try:
        transport.add_server_key(HOST_KEY)
        guest = Guest(allowed)
        transport.start_server(server=guest)
        channel = transport.accept(10)
        if channel is not None and guest.ready.wait(10):
            if guest.command == b"echo hello":
                channel.sendall(b"hello\n")
                channel.send_exit_status(0)
            else:
                channel.sendall_stderr(b"nope\n")
                channel.send_exit_status(3)
            channel.close()
            time.sleep(0.2)
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        transport.close()


def serve(listener: socket.socket, allowed: paramiko.PKey, stop: threading.Event) -> None:
    listener.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        threading.Thread(target=handle, args=(conn, allowed), daemon=True).start()


@pytest.fixture
def node(tmp_path: Path) -> nodestate.NodeRecord:
    key_file, _ = nodestate.make_ssh_key(tmp_path, "test")
    port = free_port()
    nodestate.pin_host_key(tmp_path, port, f"{HOST_KEY.get_name()} {HOST_KEY.get_base64()}")
    return nodestate.NodeRecord(
        node_id="n-1",
        run_id="r",
        instance_id="iid",
        backend="qemu",
        ssh_port=port,
        ssh_user="ops",
        ssh_key=str(key_file),
        workdir=str(tmp_path),
        console_log=str(tmp_path / "console.log"),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def start_guest(node: nodestate.NodeRecord) -> Iterator[object]:
    """Call it (optionally after a delay) to start the fake sshd on the node's port."""
    stop = threading.Event()
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(delay_s: float = 0.0) -> None:
        def run() -> None:
            time.sleep(delay_s)
            listener = socket.create_server(("127.0.0.1", node.ssh_port))
            listeners.append(listener)
            serve(listener, paramiko.ECDSAKey.from_private_key_file(node.ssh_key), stop)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    stop.set()
    for thread in threads:
        thread.join(15)
    for listener in listeners:
        listener.close()


def test_command_runs_and_returns_status_and_output(
    node: nodestate.NodeRecord, start_guest: object
) -> None:
    start_guest()  # type: ignore[operator]
    client = ssh.connect(node, wait_s=20)
    try:
        assert ssh.execute(client, "echo hello") == ssh.Result(0, b"hello\n", b"")
    finally:
        client.close()
    pinned = node.known_hosts.read_text()
    client = ssh.connect(node, wait_s=20)
    try:
        assert ssh.execute(client, "false") == ssh.Result(3, b"", b"nope\n")
    finally:
        client.close()
    assert node.known_hosts.read_text() == pinned, "nothing learned on use"


def test_connect_retries_until_sshd_comes_up(
    node: nodestate.NodeRecord, start_guest: object
) -> None:
    start_guest(delay_s=3)  # type: ignore[operator]
    client = ssh.connect(node, wait_s=30)
    client.close()


def test_unreachable_node_is_one_clear_error(node: nodestate.NodeRecord) -> None:
    with pytest.raises(click.ClickException, match="cannot reach node n-1 over SSH"):
        ssh.connect(node, wait_s=1)


def test_changed_host_key_is_refused(node: nodestate.NodeRecord, start_guest: object) -> None:
    other = paramiko.ECDSAKey.generate(bits=256)
    node.known_hosts.write_text(
        f"[127.0.0.1]:{node.ssh_port} {other.get_name()} {other.get_base64()}\n"
    )
    start_guest()  # type: ignore[operator]
    with pytest.raises(click.ClickException, match="other than the one pinned at boot"):
        ssh.connect(node, wait_s=20)


def test_a_host_key_nobody_pinned_is_refused_at_once(
    node: nodestate.NodeRecord, start_guest: object
) -> None:
    node.known_hosts.write_text("")  # as if no key were pinned for this port
    start_guest()  # type: ignore[operator]
    started = time.monotonic()
    with pytest.raises(click.ClickException, match="other than the one pinned at boot"):
        ssh.connect(node, wait_s=60)
    assert time.monotonic() - started < 30, "refused, not retried until the deadline"
    assert node.known_hosts.read_text() == "", "and not learned either"


def test_password_login_is_refused(node: nodestate.NodeRecord, start_guest: object) -> None:
    start_guest()  # type: ignore[operator]
    deadline = time.monotonic() + 10
    while not ssh.banner_ready(node.ssh_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ssh.password_login_refused(node.ssh_port, "ops")


def test_banner_needs_a_real_ssh_server() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]

        def hang_up() -> None:
            conn, _ = silent.accept()
            conn.close()

        threading.Thread(target=hang_up, daemon=True).start()
        assert not ssh.banner_ready(port, timeout=2)


def test_openssh_command_uses_the_nodes_key_and_known_hosts(node: nodestate.NodeRecord) -> None:
    argv = ssh.openssh_command(node)
    assert argv[:5] == ["ssh", "-p", str(node.ssh_port), "-i", node.ssh_key]
    assert f"UserKnownHostsFile={node.known_hosts}" in argv
    assert argv[-1] == "ops@127.0.0.1"
