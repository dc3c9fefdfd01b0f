"""How a device is reached, checked before it is stored or used: a libvirt connection
URI, a container host, an SSH address. Each check returns the text as given or raises
ValueError with a one-line reason.

These strings end up on command lines (ssh, docker -H) and in libvirt's own ssh
transport, so the forms are narrow: no option-like leading `-`, no spaces or control
characters, and of libvirt's URI parameters only those that do not name a local program
to run (libvirt's `command=` would run any file it names).
"""

from __future__ import annotations

import re

_USER = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
_HOST = r"\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9][A-Za-z0-9.-]{0,252}"
_PORT = r"[0-9]{1,5}"

LOCAL_LIBVIRT = "qemu:///system"
_LIBVIRT_SSH = re.compile(
    rf"qemu\+ssh://(?:(?P<user>{_USER})@)?(?P<host>{_HOST})(?::(?P<port>{_PORT}))?"
    r"/system(?:\?(?P<query>.*))?",
    re.DOTALL,
)
LIBVIRT_PARAMETERS = ("keyfile", "mode", "no_tty", "no_verify", "socket")
"""libvirt's ssh transport parameters a device may set. `command`, `netcat`, `proxy` and
`name` may not: they choose programs and the remote URI. `known_hosts`,
`known_hosts_verify` and `sshauth` belong to the libssh transports: the ssh transport
ignores them, so accepting them would suggest a host key check that does not happen."""
_PARAMETER_VALUE = re.compile(r"[A-Za-z0-9_./%~+:,@-]{1,1024}")

LOCAL_CONTAINER_HOST = "local"
_CONTAINER_SSH = re.compile(
    rf"ssh://(?:(?P<user>{_USER})@)?(?P<host>{_HOST})(?::(?P<port>{_PORT}))?"
)
RUNTIMES = ("runc", "docker", "podman")
LOCAL_ONLY_RUNTIMES = ("runc",)

# As `imagefactory install --ssh` takes it: user@host[:port].
_SSH_ADDRESS = re.compile(rf"(?P<user>{_USER})@(?P<host>{_HOST})(?::(?P<port>{_PORT}))?")

# The master as a device reaches it: a plain URL, one word for a shell or install.sh.
_URL_PATH = r"(?:/[A-Za-z0-9._~/-]*)?"
_MASTER_URL = re.compile(rf"https?://(?P<host>{_HOST})(?::(?P<port>{_PORT}))?{_URL_PATH}")

# The same forms as JSON Schema patterns, for the OpenAPI document (and the clients and
# test generators that read it); the checks below also say what is wrong and check ports.
_PORT_RANGE = (
    r"0*(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)
_AT_HOST = rf"(?:{_USER}@)?(?:{_HOST})(?::{_PORT_RANGE})?"
_PARAMETER = rf"(?:{'|'.join(LIBVIRT_PARAMETERS)})={_PARAMETER_VALUE.pattern}"
LIBVIRT_URI_PATTERN = (
    rf"^(?:qemu:///system|qemu\+ssh://{_AT_HOST}/system(?:\?{_PARAMETER}(?:&{_PARAMETER})*)?)$"
)
CONTAINER_HOST_PATTERN = rf"^(?:local|ssh://{_AT_HOST})$"
SSH_ADDRESS_PATTERN = rf"^{_USER}@(?:{_HOST})(?::{_PORT_RANGE})?$"
MASTER_URL_PATTERN = rf"^https?://(?:{_HOST})(?::{_PORT_RANGE})?{_URL_PATH}$"


def check_libvirt_uri(text: str) -> str:
    """`qemu:///system`, or `qemu+ssh://[user@]host[:port]/system[?param=value&...]`."""
    if text == LOCAL_LIBVIRT:
        return text
    match = _LIBVIRT_SSH.fullmatch(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not {LOCAL_LIBVIRT} or qemu+ssh://[USER@]HOST[:PORT]/system[?...]"
        )
    _check_port(text, match["port"])
    if match["query"] is not None:
        _check_parameters(text, match["query"])
    return text


def _check_parameters(uri: str, query: str) -> None:
    seen: set[str] = set()
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if name not in LIBVIRT_PARAMETERS:
            raise ValueError(
                f"libvirt URI parameter {name!r} is not allowed: {', '.join(LIBVIRT_PARAMETERS)}"
            )
        if name in seen:
            raise ValueError(f"libvirt URI parameter {name!r} is given twice in {uri!r}")
        if not equals or not _PARAMETER_VALUE.fullmatch(value):
            raise ValueError(
                f"libvirt URI parameter {name}: {value!r} is not 1-1024 of [A-Za-z0-9_./%~+:,@-]"
            )
        seen.add(name)


def check_container_host(text: str) -> str:
    """`local` (this machine), or `ssh://[user@]host[:port]` (docker/podman over SSH)."""
    if text == LOCAL_CONTAINER_HOST:
        return text
    match = _CONTAINER_SSH.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not {LOCAL_CONTAINER_HOST} or ssh://[USER@]HOST[:PORT]")
    _check_port(text, match["port"])
    return text


def check_runtime(host: str, runtime: str) -> str:
    """A runtime the host can run: runc only on this machine."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown container runtime {runtime!r}: {', '.join(RUNTIMES)}")
    if runtime in LOCAL_ONLY_RUNTIMES and host != LOCAL_CONTAINER_HOST:
        raise ValueError(
            f"runtime {runtime} runs containers on the local host only, not {host}: "
            "use docker or podman there"
        )
    return runtime


def check_ssh_address(text: str) -> str:
    """`user@host[:port]`, `user@[v6addr][:port]`."""
    split_ssh_address(text)
    return text


def split_ssh_address(text: str) -> tuple[str, str, int]:
    """The user, the host (an IPv6 address without its brackets) and the port (22 if not
    given) of an SSH address; ValueError if it is not one."""
    match = _SSH_ADDRESS.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not USER@HOST[:PORT] (e.g. root@10.0.0.7:22)")
    _check_port(text, match["port"])
    return match["user"], match["host"].strip("[]"), int(match["port"] or 22)


def check_master_url(text: str) -> str:
    """`http[s]://host[:port][/path]`: the master's URL as a device reaches it."""
    match = _MASTER_URL.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not http[s]://HOST[:PORT][/PATH]")
    _check_port(text, match["port"])
    return text


def _check_port(text: str, port: str | None) -> None:
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port {port} is not 1-65535")
