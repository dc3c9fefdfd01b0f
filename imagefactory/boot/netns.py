"""A container node's network: a fresh network namespace with only loopback, where
127.0.0.1:PORT is the master and nothing else exists.

    ip netns add fleetbake-NODE ─► lo up ─► listen(127.0.0.1:PORT) made inside it
      ─► `python -m imagefactory.boot.nsforward` (host side) accepts there and connects
         each connection to the master on the host's loopback (boot/relay.py copies)

The namespace has no other interface and no route, so any other address is unreachable
by construction (the container counterpart of QEMU's `restrict=on` + guestfwd). The
listening socket is made by switching this thread into the namespace for one bind
(a socket keeps the namespace it was made in), then handed to the forwarder process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from imagefactory.errors import die
from imagefactory.run import CommandError, run

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000


def netns_name(node_id: str) -> str:
    return f"fleetbake-{node_id}"


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def create(name: str) -> Path:
    """A new network namespace with loopback up; replaces a stale one of that name."""
    if os.geteuid() != 0:
        raise die(
            "container nodes need root here (a network namespace per container)",
            hint="run `imagefactory boot --runtime ...` as root",
        )
    delete(name)
    try:
        run(["ip", "netns", "add", name])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
    except CommandError as exc:
        delete(name)
        raise die(f"cannot make network namespace {name}: {exc.stderr.strip()}") from None
    return netns_path(name)


def delete(name: str) -> None:
    if netns_path(name).exists():
        run(["ip", "netns", "delete", name], check=False)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def inside(path: Path) -> Iterator[None]:
    """Run the block with this thread in the network namespace at `path`."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


def listen_inside(path: Path, port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:`port` of the namespace at `path`."""
    with inside(path):
        return socket.create_server(("127.0.0.1", port), backlog=64)
