"""The guestfwd relay: QEMU starts `python -m imagefactory.boot.relay HOST PORT` for every TCP
connection the guest opens to the master's guest-side address. The connection is this
process's stdin/stdout; the relay copies bytes both ways to HOST:PORT on the host's
loopback (checked when the boot command line is made) until both sides are done.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys

CHUNK = 65536


def relay(guest_in: int, guest_out: int, master: socket.socket) -> None:
    """Copy guest -> master and master -> guest until the master closes its side."""
    sel = selectors.DefaultSelector()
    sel.register(guest_in, selectors.EVENT_READ, "guest")
    sel.register(master, selectors.EVENT_READ, "master")
    while sel.get_map():
        for key, _ in sel.select():
            if key.data == "guest":
                data = os.read(guest_in, CHUNK)
                if data:
                    master.sendall(data)
                else:  # the guest finished sending: pass the half-close on
                    sel.unregister(guest_in)
                    master.shutdown(socket.SHUT_WR)
            else:
                data = master.recv(CHUNK)
                if not data:
                    return
                while data:
                    data = data[os.write(guest_out, data) :]


def main(argv: list[str]) -> int:
    host, port = argv
    try:
        master = socket.create_connection((host, int(port)), timeout=10)
    except OSError:
        return 1  # the guest sees its connection closed, and retries like on any outage
    master.settimeout(None)
    with master:
        try:
            relay(sys.stdin.fileno(), sys.stdout.fileno(), master)
        except OSError:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
