"""QEMU command lines and master forwards, as tables of input and expected argv."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click
import pytest

from imagefactory.boot import qemu
from imagefactory.targets import get_target


def config(target: str = "x86_64-linux", **overrides: object) -> qemu.VmConfig:
    fields: dict[str, object] = {
        "name": "fleetbake-n-1",
        "target": get_target(target),
        "accel": "tcg",
        "disk": Path("/s/n-1/overlay.qcow2"),
        "seed": Path("/s/n-1/seed.iso"),
        "console_log": Path("/s/n-1/console.log"),
        "ssh_port": 2201,
    }
    fields.update(overrides)
    return qemu.VmConfig(**fields)  # type: ignore[arg-type]


def values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == option]


def test_x86_64_under_tcg() -> None:
    argv = qemu.qemu_argv(config())
    assert argv[0] == "qemu-system-x86_64"
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert values(argv, "-machine") == ["q35"]
    assert values(argv, "-accel") == ["tcg"]
    assert values(argv, "-cpu") == ["max"]
    assert values(argv, "-display") == ["none"]
    assert values(argv, "-m") == ["1024"] and values(argv, "-smp") == ["2"]
    assert "if=pflash" not in " ".join(argv)  # SeaBIOS, QEMU's default firmware
    assert values(argv, "-drive") == [
        "if=none,id=disk0,format=qcow2,discard=unmap,file=/s/n-1/overlay.qcow2",
        "if=none,id=seed0,format=raw,media=cdrom,readonly=on,file=/s/n-1/seed.iso",
    ]
    assert values(argv, "-device") == [
        "virtio-blk-pci,drive=disk0,bootindex=1",
        "virtio-scsi-pci,id=scsi0",
        "scsi-cd,bus=scsi0.0,drive=seed0",
        "virtio-net-pci,netdev=net0",
        "virtio-rng-pci",
    ]
    assert values(argv, "-netdev") == ["user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2201-:22"]
    assert values(argv, "-chardev") == ["file,id=console0,path=/s/n-1/console.log"]
    assert values(argv, "-serial") == ["chardev:console0"]
    assert "-sandbox" not in argv  # a seccomp sandbox would kill the guestfwd relay


def test_kvm_uses_the_host_cpu() -> None:
    argv = qemu.qemu_argv(config(accel="kvm"))
    assert values(argv, "-accel") == ["kvm"] and values(argv, "-cpu") == ["host"]


def test_aarch64_gets_uefi_pflash_and_its_extra_args() -> None:
    fw = qemu.PflashPair(code=Path("/fw/CODE.fd"), vars=Path("/s/n-1/vars.fd"))
    argv = qemu.qemu_argv(config("aarch64-linux", firmware=fw))
    assert argv[0] == "qemu-system-aarch64"
    assert values(argv, "-machine") == ["virt"]
    assert values(argv, "-cpu") == ["max,pauth-impdef=on"]
    assert values(argv, "-drive")[:2] == [
        "if=pflash,format=raw,unit=0,readonly=on,file=/fw/CODE.fd",
        "if=pflash,format=raw,unit=1,file=/s/n-1/vars.fd",
    ]
    assert values(argv, "-boot") == ["strict=off"]


def test_commas_in_paths_are_doubled() -> None:
    argv = qemu.qemu_argv(config(disk=Path("/a,b/overlay.qcow2")))
    assert "file=/a,,b/overlay.qcow2" in values(argv, "-drive")[0]


@pytest.mark.parametrize(
    ("url", "host", "port", "guest_url"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1", 8080, "http://10.0.2.100:8080"),
        ("http://localhost:9000/api/", "127.0.0.1", 9000, "http://10.0.2.100:9000/api/"),
        ("http://127.0.0.5", "127.0.0.5", 80, "http://10.0.2.100:80"),
        ("https://[::1]:8443", "::1", 8443, "https://10.0.2.100:8443"),
    ],
)
def test_master_forward(url: str, host: str, port: int, guest_url: str) -> None:
    assert qemu.master_forward(url) == qemu.MasterForward(host, port, guest_url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://192.0.2.7:8080", "not on this host's loopback"),
        ("http://example.org", "not on this host's loopback"),
        ("ftp://127.0.0.1", "invalid master URL"),
        ("127.0.0.1:8080", "invalid master URL"),
        ("http://127.0.0.1:99999", "invalid port"),
    ],
)
def test_master_forward_refuses(url: str, message: str) -> None:
    with pytest.raises(click.ClickException, match=message):
        qemu.master_forward(url)


def test_guestfwd_runs_the_relay_per_connection() -> None:
    master = qemu.master_forward("http://127.0.0.1:8080")
    (netdev,) = values(qemu.qemu_argv(config(master=master)), "-netdev")
    rules = netdev.split(",")
    assert rules[:4] == ["user", "id=net0", "restrict=on", "hostfwd=tcp:127.0.0.1:2201-:22"]
    prefix = "guestfwd=tcp:10.0.2.100:8080-cmd:"
    assert rules[4].startswith(prefix)
    assert shlex.split(rules[4][len(prefix) :]) == [
        sys.executable,
        "-m",
        "imagefactory.boot.relay",
        "127.0.0.1",
        "8080",
    ]


def test_overlay_is_backed_by_the_absolute_image_path(tmp_path: Path) -> None:
    argv = qemu.overlay_argv(Path("img.qcow2"), "qcow2", tmp_path / "o.qcow2")
    assert argv[:6] == ["qemu-img", "create", "-q", "-f", "qcow2", "-F"]
    assert argv[6:] == ["qcow2", "-b", str(Path("img.qcow2").resolve()), str(tmp_path / "o.qcow2")]
