"""`imagefactory devices add|list|show|remove` as users run them, against a real
`imagefactory serve` on loopback."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.services_harness import BIN, ServerProcess, free_port

pytestmark = pytest.mark.timeout(300)
FINGERPRINT = "SHA256:" + "A" * 42 + "E"
DIGEST = "sha256:" + "cd" * 32


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path)
    try:
        yield proc.start()
    finally:
        proc.stop()


def devices(server: ServerProcess, *args: str, url: str = "") -> subprocess.CompletedProcess[str]:
    argv = [str(BIN / "imagefactory"), "devices", *args, "--url", url or server.url,
            "--admin-token-file", str(server.admin_token_file)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert done.stdout == "" and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[-1]


def test_add_list_show_remove(server: ServerProcess) -> None:
    vm = devices(server, "add", "hv1-vm", "--arch", "x86_64", "--kind", "vm",
                 "--libvirt-uri", "qemu+ssh://root@127.0.0.1:2222/system?keyfile=/k",
                 "--pool", "fleet")  # fmt: skip
    assert vm.returncode == 0, vm.stderr
    assert vm.stdout == "added device hv1-vm: x86_64, vm\n"
    again = devices(server, "add", "hv1-vm", "--arch", "x86_64", "--kind", "vm",
                    "--libvirt-uri", "qemu:///system", "--json")  # fmt: skip
    assert again.returncode == 0, again.stderr
    replaced = json.loads(again.stdout)
    assert replaced["libvirt"] == {"uri": "qemu:///system", "pool": "default"}
    assert replaced["created_at"] < replaced["updated_at"]

    edge = devices(server, "add", "edge-7", "--arch", "aarch64", "--kind", "container",
                   "--kind", "baremetal", "--container-host", "ssh://ops@edge-7:2200",
                   "--runtime", "podman", "--ssh", "root@[fd00::7]:2222",
                   "--host-key-fingerprint", FINGERPRINT,
                   "--master-url", "https://10.0.0.5:8750")  # fmt: skip
    assert edge.returncode == 0, edge.stderr
    local = devices(server, "add", "box", "--arch", "x86_64", "--kind", "container",
                    "--container-host", "local", "--json")  # fmt: skip
    assert json.loads(local.stdout)["container"] == {"host": "local", "runtime": "runc"}

    listed = json.loads(devices(server, "list", "--json").stdout)
    assert [d["id"] for d in listed] == ["box", "edge-7", "hv1-vm"]
    assert listed[1]["kinds"] == ["container", "baremetal"]
    assert listed[1]["ssh"] == {"address": "root@[fd00::7]:2222",
                                "host_key_fingerprint": FINGERPRINT}  # fmt: skip
    assert listed[1]["master_url"] == "https://10.0.0.5:8750"
    table = devices(server, "list").stdout.splitlines()
    assert table[0].split() == ["ID", "ARCH", "KINDS", "REACH", "DEPLOYED"]
    assert table[2].split() == [
        "edge-7", "aarch64", "container,baremetal", "container=ssh://ops@edge-7:2200",
        "ssh=root@[fd00::7]:2222", "-",
    ]  # fmt: skip

    # What deploy records; show and remove read it back.
    deployment = {
        "kind": "vm", "target": "x86_64-linux", "environment": DIGEST,
        "node_id": "hv1-vm-3f9c2a", "run_id": "r-1", "details": {"domain": "d"},
    }  # fmt: skip
    recorded = httpx.put(f"{server.url}/v1/devices/hv1-vm/deployment", json=deployment,
                         headers={"Authorization": f"Bearer {server.admin_token}"})  # fmt: skip
    assert recorded.status_code == 200, recorded.text
    shown = devices(server, "show", "hv1-vm")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[:2] == [
        "device hv1-vm  arch x86_64  kinds vm",
        "  libvirt    qemu:///system  pool default",
    ]
    assert f"  deployed   vm x86_64-linux {DIGEST}" in shown.stdout
    assert (
        json.loads(devices(server, "show", "hv1-vm", "--json").stdout)["deployment"]["node_id"]
        == "hv1-vm-3f9c2a"
    )

    refused = one_error_line(devices(server, "remove", "hv1-vm"))
    assert refused == (
        "Error: device hv1-vm has a deployment (vm node hv1-vm-3f9c2a); removing the record "
        "would leave it running unrecorded (hint: `imagefactory undeploy hv1-vm` first, or "
        "--force)"
    )
    forced = devices(server, "remove", "hv1-vm", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["removed"] is True
    plain = devices(server, "remove", "box")
    assert plain.returncode == 0 and plain.stdout == "removed device box\n"
    assert [d["id"] for d in json.loads(devices(server, "list", "--json").stdout)] == ["edge-7"]
    assert [r[0] for r in server.rows("devices")] == ["edge-7"]

    unknown = one_error_line(devices(server, "show", "hv1-vm"))
    assert unknown == "Error: GET /v1/devices/hv1-vm: 404 no device hv1-vm"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kind", "vm"], "Error: --kind vm needs --libvirt-uri (hint: qemu:///system"),
        (["--kind", "vm", "--kind", "vm", "--libvirt-uri", "qemu:///system"],
         "names a kind twice"),
        (["--kind", "container", "--container-host", "ssh://ops@e7"],
         "Error: --runtime: runtime runc runs containers on the local host only"),
        (["--kind", "vm", "--libvirt-uri", "qemu:///system", "--runtime", "docker"],
         "Error: --runtime goes with --container-host"),
        (["--kind", "vm", "--libvirt-uri", "qemu+ssh://h/system?command=/bin/sh"],
         "'command' is not allowed"),
        (["--kind", "baremetal", "--ssh", "10.0.0.7"], "is not USER@HOST[:PORT]"),
        (["--kind", "baremetal", "--ssh", "r@h", "--master-url", "http://m/$(id)"],
         "is not http[s]://HOST[:PORT][/PATH]"),
        (["--kind", "baremetal", "--ssh", "r@h", "--host-key-fingerprint", "x"],
         "is not a fingerprint"),
        (["--kind", "tape"], "Invalid value for '--kind'"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_before_any_request(
    server: ServerProcess, args: list[str], message: str
) -> None:
    """The URL points at a closed port: the error is the check's, not the connection's."""
    closed = f"http://127.0.0.1:{free_port()}"
    done = devices(server, "add", "edge-1", "--arch", "x86_64", *args, url=closed)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "cannot reach" not in done.stderr
    assert "Traceback" not in done.stderr


def test_server_refusals_come_back_as_one_line(server: ServerProcess) -> None:
    keyfile = "/k" + "x" * 1020
    long_uri = "qemu+ssh://h/system?" + "&".join(
        f"{name}={keyfile}" for name in ("keyfile", "no_tty", "socket")
    )
    too_long = one_error_line(devices(server, "add", "edge-1", "--arch", "x86_64",
                                      "--kind", "vm", "--libvirt-uri", long_uri))  # fmt: skip
    assert too_long == (
        "Error: PUT /v1/devices/edge-1: 400 invalid libvirt.uri: String should have at most "
        "2048 characters"
    )
    wrong_token = server.workdir / "wrong-token"
    wrong_token.write_text("nope\n")
    wrong_token.chmod(0o600)
    argv = [str(BIN / "imagefactory"), "devices", "list", "--url", server.url,
            "--admin-token-file", str(wrong_token)]  # fmt: skip
    denied = one_error_line(subprocess.run(argv, capture_output=True, text=True, timeout=120))
    assert denied == "Error: GET /v1/devices: 401 invalid admin token"
    assert server.rows("devices") == []
