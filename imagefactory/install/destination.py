"""`USER@HOST[:PORT]` as given to `imagefactory install --ssh`."""

from __future__ import annotations

import re
from dataclasses import dataclass

from imagefactory.errors import die

# user@host, user@host:port, user@[v6addr], user@[v6addr]:port
_FORM = re.compile(
    r"(?P<user>[A-Za-z0-9_][A-Za-z0-9_.-]*)@"
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*))"
    r"(?::(?P<port>[0-9]{1,5}))?\Z"
)


@dataclass(frozen=True)
class Destination:
    user: str
    host: str
    port: int = 22

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + ("" if self.port == 22 else f":{self.port}")

    @property
    def known_hosts_name(self) -> str:
        """How OpenSSH's known_hosts names this host: `host`, or `[host]:port`."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


def parse_destination(text: str) -> Destination:
    match = _FORM.match(text)
    port = int(match["port"]) if match and match["port"] else 22
    if match is None or not 0 < port < 65536:
        raise die(
            f"--ssh {text!r} is not USER@HOST[:PORT]",
            hint="e.g. root@10.0.0.7, ops@edge-1.lab:2222 or root@[fd00::7]",
        )
    return Destination(match["user"], match["v6"] or match["host"], port)
