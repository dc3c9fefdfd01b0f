"""`USER@HOST[:PORT]` as given to `imagefactory install --ssh`."""

from __future__ import annotations

from dataclasses import dataclass

from imagefactory.errors import die
from imagefactory.reach import split_ssh_address


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
    try:
        return Destination(*split_ssh_address(text))
    except ValueError:
        raise die(
            f"--ssh {text!r} is not USER@HOST[:PORT]",
            hint="e.g. root@10.0.0.7, ops@edge-1.lab:2222 or root@[fd00::7]",
        ) from None
