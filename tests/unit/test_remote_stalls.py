"""install/remote.py against a device that stops answering: a real paramiko server on
loopback that goes silent, or drops the connection, in the middle of a command."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pytest
from paramiko.common import AUTH_SUCCESSFUL, OPEN_SUCCEEDED

from imagefactory.install import remote
from imagefactory.install.destination import Destination
from imagefactory.install.hostkeys import HostKeyPolicy, fingerprint

HOST_KEY = paramiko.ECDSAKey.generate(bits=256)
CLIENT_KEY = paramiko.ECDSAKey.generate(bits=256)


class Device(paramiko.ServerInterface):
    """Any key for `ops`; every command prints one line, then `then` happens."""

    def __init__(self, then: str) -> None:
        self.then = then
        self.channel: paramiko.Channel | None = None
        self.started = threading.Event()

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.channel = channel
        self.started.set()
        return True


@dataclass
class Server:
    then: str
    listener: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    transports: list[paramiko.Transport] = field(default_factory=list)

    @property
    def dest(self) -> Destination:
        return Destination("ops", "127.0.0.1", self.listener.getsockname()[1])

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        transport = paramiko.Transport(conn)
        self.transports.append(transport)
        transport.add_server_key(HOST_KEY)
        device = Device(self.then)
        transport.start_server(server=device)
        while transport.is_active():  # each command: one line, then silence or a drop
            if not device.started.wait(0.2):
                continue
            device.started.clear()
            assert device.channel is not None
            device.channel.sendall(b"installing fleetbake-node...\n")
            if self.then == "drop":
                conn.shutdown(socket.SHUT_RDWR)  # as a device that reboots mid-command
                conn.close()


@pytest.fixture(params=["silent", "drop"])
def device(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, object]]:
    server = Server(request.param)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    policy = HostKeyPolicy(tmp_path / "known_hosts", frozenset({fingerprint(HOST_KEY)}))
    key_file = tmp_path / "id"
    CLIENT_KEY.write_private_key_file(str(key_file))
    client = remote.connect(server.dest, policy, key_file)
    try:
        yield server, client
    finally:
        client.close()
        for transport in server.transports:
            transport.close()
        server.listener.close()
        thread.join(10)


def test_a_device_that_stops_answering_fails_the_step(device: tuple[Server, object]) -> None:
    server, client = device
    assert isinstance(client, paramiko.SSHClient)
    lines: list[str] = []
    expected = "no output from the device for 1 s" if server.then == "silent" else "lost the conn"
    with pytest.raises(remote.RemoteError, match=expected):
        remote.run_streaming(client, "sh install.sh", lines.append, idle_s=1.0)
    assert lines == ["installing fleetbake-node..."]


def test_a_short_command_that_hangs_fails(device: tuple[Server, object]) -> None:
    server, client = device
    assert isinstance(client, paramiko.SSHClient)
    if server.then == "drop":
        with pytest.raises(remote.RemoteError, match="lost the connection"):
            remote.run_quiet(client, "mktemp -d", timeout=1.0)
    else:
        with pytest.raises(remote.RemoteError, match="`mktemp -d` gave no answer in 1 s"):
            remote.run_quiet(client, "mktemp -d", timeout=1.0)


def test_the_connection_watches_for_a_device_that_vanished(
    device: tuple[Server, object],
) -> None:
    """A device that lost power sends no reset: keepalives go out, and the kernel gives up
    on the connection once they stay unacknowledged for DEAD_PEER_S."""
    _, client = device
    assert isinstance(client, paramiko.SSHClient)
    transport = client.get_transport()
    assert transport is not None and isinstance(transport.sock, socket.socket)
    timeout_ms = transport.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    assert timeout_ms == remote.DEAD_PEER_S * 1000
    assert transport.packetizer._Packetizer__keepalive_interval == remote.KEEPALIVE_S  # type: ignore[attr-defined]


@pytest.mark.parametrize("device", ["drop"], indirect=True)
def test_an_upload_after_the_device_dropped_says_so(device: tuple[Server, object]) -> None:
    _, client = device
    assert isinstance(client, paramiko.SSHClient)
    with pytest.raises(remote.RemoteError, match="lost the connection"):
        remote.run_streaming(client, "sh install.sh", lambda _line: None, idle_s=5.0)
    with pytest.raises(remote.RemoteError, match="lost the connection to the device"):
        remote.upload(client, {"/tmp/install.sh": (b"#!/bin/sh\n", 0o700)})
