"""imagefactory/reach.py and imagefactory/kinds.py as tables: which ways to reach a device
are accepted, which are refused and why, and which kinds each architecture supports."""

from __future__ import annotations

import re
from typing import Any, get_args

import pytest

from imagefactory.errors import UserError
from imagefactory.install.destination import parse_destination
from imagefactory.kinds import ARCHS, KIND_NAMES, KINDS, first_match, supported, targets_for
from imagefactory.reach import (
    CONTAINER_HOST_PATTERN,
    LIBVIRT_URI_PATTERN,
    MASTER_URL_PATTERN,
    RUNTIMES,
    SSH_ADDRESS_PATTERN,
    check_container_host,
    check_libvirt_uri,
    check_master_url,
    check_runtime,
    check_ssh_address,
)
from imagefactory.server.device_schemas import KindName, Runtime
from imagefactory.targets import TARGETS

GOOD_URIS = [
    "qemu:///system",
    "qemu+ssh://hv1/system",
    "qemu+ssh://root@hv1.lab/system",
    "qemu+ssh://root@192.0.2.7:2222/system",
    "qemu+ssh://root@[fd00::7]:22/system",
    "qemu+ssh://root@hv1/system?keyfile=/root/.ssh/id_ed25519&no_verify=1",
    "qemu+ssh://root@hv1/system?no_tty=1&mode=direct&socket=/run/libvirt/libvirt-sock",
]
BAD_URIS = {
    "qemu+ssh://hv1/system?known_hosts=/tmp/kh": "'known_hosts' is not allowed",
    "qemu:///session": "is not qemu:///system",
    "qemu+ssh://hv1/session": "is not qemu:///system",
    "qemu+tls://hv1/system": "is not qemu:///system",
    "qemu+ssh:///system": "is not qemu:///system",
    "qemu+ssh://-oProxyCommand=sh/system": "is not qemu:///system",
    "qemu+ssh://ro ot@hv1/system": "is not qemu:///system",
    "qemu+ssh://hv1:0/system": "port 0 is not 1-65535",
    "qemu+ssh://hv1/system?command=/bin/sh": "'command' is not allowed",
    "qemu+ssh://hv1/system?netcat=nc": "'netcat' is not allowed",
    "qemu+ssh://hv1/system?name=qemu:///session": "'name' is not allowed",
    "qemu+ssh://hv1/system?keyfile=a&keyfile=b": "given twice",
    "qemu+ssh://hv1/system?keyfile=": "is not 1-1024 of",
    "qemu+ssh://hv1/system?keyfile": "is not 1-1024 of",
    "qemu+ssh://hv1/system?keyfile=a b": "is not 1-1024 of",
    "qemu+ssh://hv1/system?keyfile=a\nb": "is not 1-1024 of",
    " qemu:///system": "is not qemu:///system",
}


@pytest.mark.parametrize("uri", GOOD_URIS)
def test_libvirt_uris_accepted(uri: str) -> None:
    assert check_libvirt_uri(uri) == uri


@pytest.mark.parametrize(("uri", "why"), BAD_URIS.items())
def test_libvirt_uris_refused(uri: str, why: str) -> None:
    with pytest.raises(ValueError, match=why.replace("?", r"\?")) as caught:
        check_libvirt_uri(uri)
    assert "\n" not in str(caught.value).replace(repr(uri), "")


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("local", True),
        ("ssh://edge-7", True),
        ("ssh://ops@edge-7:2222", True),
        ("ssh://ops@[fd00::7]", True),
        ("LOCAL", False),
        ("tcp://10.0.0.1:2375", False),
        ("unix:///var/run/docker.sock", False),
        ("ssh://ops@edge-7/path", False),
        ("ssh://-oProxyCommand=sh", False),
        ("ssh://ops@edge-7:99999", False),
    ],
)
def test_container_hosts(host: str, ok: bool) -> None:
    if ok:
        assert check_container_host(host) == host
    else:
        with pytest.raises(ValueError):
            check_container_host(host)


def test_runc_runs_locally_only() -> None:
    assert [check_runtime("local", r) for r in RUNTIMES] == list(RUNTIMES)
    assert check_runtime("ssh://ops@edge-7", "podman") == "podman"
    with pytest.raises(ValueError, match="runc runs containers on the local host only"):
        check_runtime("ssh://ops@edge-7", "runc")
    with pytest.raises(ValueError, match="unknown container runtime 'lxc'"):
        check_runtime("local", "lxc")


SSH_ADDRESSES = [
    "root@10.0.0.7",
    "root@10.0.0.7:22",
    "ops@edge-1.lab:2222",
    "root@[fd00::7]",
    "root@[fd00::7]:2222",
    "_svc@h",
    "10.0.0.7",
    "root@",
    "@h",
    "-oProxyCommand=x@h",
    "root@-h",
    "root@h:0",
    "root@h:65536",
    "root@h:port",
    "root@h extra",
    "root@h\n",
]


@pytest.mark.parametrize("address", SSH_ADDRESSES)
def test_ssh_addresses_are_what_install_takes(address: str) -> None:
    """The server stores what `imagefactory install --ssh` (deploy's bare-metal path)
    accepts, and nothing it would refuse."""
    try:
        parse_destination(address)
        install_takes = True
    except UserError:
        install_takes = False
    try:
        check_ssh_address(address)
        stored = True
    except ValueError:
        stored = False
    assert stored == install_takes


def test_kind_table() -> None:
    assert [(k.name, k.format, k.reach) for k in KINDS] == [
        ("vm", "qcow2", "libvirt"),
        ("container", "oci", "container"),
        ("baremetal", "installer", "ssh"),
    ]
    assert get_args(KindName) == KIND_NAMES, "the API's enum is the table's"
    assert get_args(Runtime) == RUNTIMES
    assert set(ARCHS) == {t.arch for t in TARGETS}


def test_targets_and_first_match() -> None:
    every = ("qcow2", "oci", "installer")
    [x86] = [t for t in TARGETS if t.arch == "x86_64"]
    assert targets_for("x86_64", "vm", every) == [x86]
    assert targets_for("x86_64", "vm", ("oci",)) == []
    assert targets_for("riscv64", "vm", every) == []
    assert targets_for("x86_64", "tape", every) == []
    match = first_match("x86_64", ["baremetal", "vm"], ("qcow2",))
    assert match is not None and (match[0], match[1].name) == (x86, "vm")
    assert first_match("x86_64", ["baremetal"], ("qcow2",)) is None
    assert supported(()) == "x86_64: nothing; aarch64: nothing"
    assert supported(("installer",)) == "x86_64: baremetal; aarch64: baremetal"


MASTER_URLS = [
    "http://10.0.2.100:8750",
    "https://master.example.net",
    "https://[fd00::5]:8750/fleet/",
    "ftp://m",
    "http://m:0",
    "http://m:70000",
    "http://m/a b",
    "http://m/$(id)",
    "http://-m",
    "https://m?x=1",
    "http://user@m",
]


def test_master_urls() -> None:
    assert check_master_url("https://[fd00::5]:8750/fleet/") == "https://[fd00::5]:8750/fleet/"
    for bad in ("ftp://m", "http://m/$(id)", "http://m:70000", "http://user@m"):
        with pytest.raises(ValueError):
            check_master_url(bad)


@pytest.mark.parametrize(
    ("pattern", "check", "values"),
    [
        (LIBVIRT_URI_PATTERN, check_libvirt_uri, [*GOOD_URIS, *BAD_URIS]),
        (CONTAINER_HOST_PATTERN, check_container_host,
         ["local", "ssh://edge-7", "ssh://ops@[fd00::7]:22", "tcp://h", "ssh://h/x", "LOCAL"]),
        (SSH_ADDRESS_PATTERN, check_ssh_address, SSH_ADDRESSES),
        (MASTER_URL_PATTERN, check_master_url, MASTER_URLS),
    ],
)  # fmt: skip
def test_openapi_patterns_follow_the_checks(pattern: str, check: Any, values: list[str]) -> None:
    """The OpenAPI document's pattern accepts every value the check accepts, and refuses
    every value the check refuses for its form (a repeated parameter only the check sees)."""
    for value in values:
        try:
            check(value)
            accepted, why = True, ""
        except ValueError as exc:
            accepted, why = False, str(exc)
        matches = re.search(pattern, value) is not None and "\n" not in value
        assert matches == accepted or (matches and "twice" in why), value
