"""A private QMP connection to a QEMU this process starts, with no socket path left to
find: the listening socket is bound in a private directory, connected to, and unlinked
before QEMU exists; QEMU gets the listening descriptor (`-chardev socket,fd=N`) and
accepts the connection that waits in its backlog. Nobody else can ever connect.

Used once, at start, to read the SSH port QEMU picked (`hostfwd=...:0-:22`): a port
chosen by this process and bound later by QEMU could be taken in between.
"""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path
from typing import Any

from imagefactory.errors import HostError

CHARDEV_ID = "qmp0"


class MonitorError(HostError):
    """QEMU closed the monitor, answered with an error, or did not answer in time."""


def listener_argv(fd: int) -> list[str]:
    """QEMU's arguments for a QMP monitor on the inherited listening socket `fd`."""
    return [
        "-chardev",
        f"socket,id={CHARDEV_ID},fd={fd},server=on,wait=off",
        "-mon",
        f"chardev={CHARDEV_ID},mode=control",
    ]


class Monitor:
    """The client end; `listener` is for QEMU (pass its descriptor, then close it here)."""

    def __init__(self, timeout_s: float) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with tempfile.TemporaryDirectory(prefix="imagefactory-qmp-") as private:
            path = str(Path(private) / "s")  # short: a socket path has at most 107 bytes
            self.listener.bind(path)
            self.listener.listen(1)
            self._sock.connect(path)  # waits in the backlog until QEMU accepts it
        self._sock.settimeout(timeout_s)
        self._reader = self._sock.makefile("rb")
        self._ready = False

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
        self.listener.close()

    def human(self, command_line: str) -> str:
        """The text of an HMP command (`info usernet`), run through QMP."""
        if not self._ready:
            self._reply()  # the greeting
            self._execute("qmp_capabilities")
            self._ready = True
        text = self._execute("human-monitor-command", {"command-line": command_line})
        if not isinstance(text, str):
            raise MonitorError(f"QEMU answered {command_line!r} with {text!r}")
        return text

    def _execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise MonitorError(f"QEMU's monitor is gone: {exc}") from None
        reply = self._reply()
        if "error" in reply:
            raise MonitorError(f"QEMU refused {command}: {reply['error'].get('desc', reply)}")
        return reply.get("return")

    def _reply(self) -> dict[str, Any]:
        """The next message that is not an asynchronous event."""
        while True:
            try:
                line = self._reader.readline()
            except TimeoutError:
                raise MonitorError("QEMU's monitor did not answer in time") from None
            except OSError as exc:
                raise MonitorError(f"QEMU's monitor is gone: {exc}") from None
            if not line:
                raise MonitorError("QEMU closed its monitor (it has exited)")
            try:
                message = json.loads(line)
            except ValueError:
                raise MonitorError(f"QEMU's monitor sent {line[:80]!r}") from None
            if isinstance(message, dict) and "event" not in message:
                return message
