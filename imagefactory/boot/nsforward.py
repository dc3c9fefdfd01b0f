"""The master forward of one container node (see boot/netns.py):

    python -m imagefactory.boot.nsforward FD MASTER_HOST MASTER_PORT NAME

FD is a listening socket inside the node's network namespace (inherited); each accepted
connection is joined to a new connection to MASTER_HOST:MASTER_PORT on the host's
loopback, copied both ways by boot/relay.py in a thread of its own. NAME only marks the
process (its command line) so `imagefactory stop` finds the right one.
"""

from __future__ import annotations

import socket
import sys
import threading

from imagefactory.boot.relay import relay


def serve_one(conn: socket.socket, host: str, port: int) -> None:
    with conn:
        try:
            master = socket.create_connection((host, port), timeout=10)
        except OSError:
            return  # the agent sees its connection closed, and retries like on any outage
        master.settimeout(None)
        with master:
            try:
                relay(conn.fileno(), conn.fileno(), master)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    fd, host, port, _name = argv
    listener = socket.socket(fileno=int(fd))
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_one, args=(conn, host, int(port)), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
