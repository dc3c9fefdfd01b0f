"""Loopback ports for tests."""

from __future__ import annotations

import socket


def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on (the kernel's pick, released again):
    a device or server that refuses connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
