"""A private QMP connection to a QEMU this process starts: one end of a socket pair is
QEMU's monitor (`-chardev socket,fd=N,server=off`), the other stays here. There is no
socket path, so nobody else can ever connect, and no path length limit to meet.

Used once, at start, to read the SSH port QEMU picked (`hostfwd=...:0-:22`): a port
chosen by this process and bound later by QEMU could be taken in between.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from imagefactory.errors import HostError

CHARDEV_ID = "qmp0"


class MonitorError(HostError):
    """QEMU closed the monitor, answered with an error, or did not answer in time."""


def monitor_argv(fd: int) -> list[str]:
    """QEMU's arguments for a QMP monitor on the inherited, connected socket `fd`."""
    return [
        "-chardev",
        f"socket,id={CHARDEV_ID},fd={fd},server=off",
        "-mon",
        f"chardev={CHARDEV_ID},mode=control",
    ]


class Monitor:
    """This process's end; `qemu_end` is for QEMU (pass its descriptor, then close it)."""

    def __init__(self, timeout_s: float) -> None:
        self._sock, self.qemu_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._reader = self._sock.makefile("rb")
        self._ready = False

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
        self.qemu_end.close()

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
