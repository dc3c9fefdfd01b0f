"""A real x86_64-linux bake (mmdebstrap base, Packer + QEMU under TCG), then the image is
opened offline and checked: what was installed, and that it was sealed."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from executor.pack import pack
from executor.pipeline import load_pipeline
from imagefactory.bake.artifacts import GUEST_PIPELINE
from imagefactory.bake.bootdisk import SECTOR, Layout
from imagefactory.bake.cache import sha256_file
from imagefactory.host.firmware import find_uefi
from tests.baking import BakedImage

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]


class RootFs:
    """Read-only access to the image's root filesystem (partition 3) with debugfs."""

    def __init__(self, raw: Path) -> None:
        self.spec = f"{raw}?offset={Layout(0).root_start * SECTOR}"

    def _debugfs(self, request: str) -> str:
        proc = subprocess.run(
            ["debugfs", "-R", request, self.spec], capture_output=True, text=True, check=True
        )
        return proc.stdout

    def read(self, path: str) -> bytes:
        proc = subprocess.run(
            ["debugfs", "-R", f"cat {path}", self.spec], capture_output=True, check=True
        )
        return proc.stdout

    def exists(self, path: str) -> bool:
        proc = subprocess.run(
            ["debugfs", "-R", f"stat {path}", self.spec], capture_output=True, text=True
        )
        return "Inode:" in proc.stdout

    def listdir(self, path: str) -> list[str]:
        return self._debugfs(f"ls -p {path}").split("/")[5::6]


@pytest.fixture(scope="module")
def rootfs(baked_image: BakedImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RootFs]:
    raw = tmp_path_factory.mktemp("inspect") / "image.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", baked_image.image, raw], check=True)
    yield RootFs(raw)
    raw.unlink()


def test_output_has_image_manifest_and_checksums(baked_image: BakedImage) -> None:
    names = {p.name for p in baked_image.dir.iterdir()}
    assert {"x86_64-linux.qcow2", "manifest.json", "SHA256SUMS"} <= names
    sums = (baked_image.dir / "SHA256SUMS").read_text().split()
    assert sums == [sha256_file(baked_image.image), "x86_64-linux.qcow2"]
    # Nothing of the build is left next to the output.
    assert not [p for p in baked_image.dir.parent.iterdir() if p.name.startswith(".")]


def test_manifest_records_inputs_versions_and_times(
    baked_image: BakedImage, tmp_path: Path
) -> None:
    m = baked_image.manifest
    assert m["target"] == "x86_64-linux"
    assert m["image"] == {
        "file": "x86_64-linux.qcow2",
        "format": "qcow2",
        "sha256": sha256_file(baked_image.image),
        "size": baked_image.image.stat().st_size,
    }
    # The same archive `executor pack` makes (packing is reproducible).
    expected_sha = pack(baked_image.pipeline, tmp_path / "p.tar.gz")
    name = load_pipeline(baked_image.pipeline).name
    assert m["pipeline"] == {"name": name, "sha256": expected_sha, "path": GUEST_PIPELINE}
    versions = m["versions"]
    assert versions["packer"].count(".") == 2
    assert versions["qemu"] and versions["executor"]
    assert versions["guest_python"].startswith("3.")
    names = {p["name"] for p in m["packages"]}
    assert {"cloud-init", "openssh-server", "python3", "systemd"} <= names
    assert {"packer", "boot", "provision", "compress", "total"} <= set(m["stages_s"])
    assert m["base"]["source"] in ("built", "cached")


def test_image_is_compressed_qcow2(baked_image: BakedImage) -> None:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", baked_image.image],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 4 * 1024**3
    assert info["actual-size"] < 400 * 1000**2


def test_executor_and_pipeline_are_installed(rootfs: RootFs, baked_image: BakedImage) -> None:
    archive = rootfs.read(GUEST_PIPELINE)
    assert hashlib.sha256(archive).hexdigest() == baked_image.manifest["pipeline"]["sha256"]
    # The launcher runs the executor's own venv, which finds the library through a .pth.
    assert rootfs.read("/usr/local/bin/executor").startswith(b"#!/opt/executor/venv/bin/python3\n")
    assert rootfs.exists("/opt/executor/lib/executor/cli.py")
    pth = "/opt/executor/venv/lib/python3.11/site-packages/fleetbake-executor.pth"
    assert rootfs.read(pth) == b"/opt/executor/lib\n"
    assert not rootfs.exists("/opt/executor/venv/bin/pip")  # no pip stays behind
    unit = rootfs.read("/etc/systemd/system/executor.service").decode()
    assert "After=cloud-init.service network-online.target" in unit
    assert f"EXECUTOR_PIPELINE_SHA256={baked_image.manifest['pipeline']['sha256']}" in unit
    assert "EnvironmentFile=-/etc/executor/node.env" in unit
    assert rootfs.exists("/etc/systemd/system/multi-user.target.wants/executor.service")
    cloud = rootfs.read("/etc/cloud/cloud.cfg.d/90-fleetbake.cfg").decode()
    assert "datasource_list: [NoCloud, None]" in cloud


def test_image_is_sealed(rootfs: RootFs) -> None:
    assert rootfs.read("/etc/machine-id") == b""
    assert rootfs.read("/etc/hostname") == b"localhost\n"
    assert not rootfs.exists("/root/.ssh/authorized_keys")
    assert not [n for n in rootfs.listdir("/etc/ssh") if n.startswith("ssh_host_")]
    assert not rootfs.exists("/var/lib/cloud/instance")
    assert not rootfs.exists("/var/tmp/fleetbake")
    shadow = rootfs.read("/etc/shadow").decode()
    root_hash = next(line for line in shadow.splitlines() if line.startswith("root:")).split(":")[1]
    assert root_hash.startswith("!")


def test_image_boots_under_uefi(baked_image: BakedImage, tmp_path: Path) -> None:
    """The bake itself proves SeaBIOS boot; here OVMF loads EFI/BOOT/BOOTX64.EFI (GRUB),
    which must find the root filesystem and start the kernel and initramfs."""
    firmware = find_uefi("x86_64")
    if firmware is None:
        pytest.skip("no x86_64 UEFI firmware (apt install ovmf)")
    disk, vars_, console = tmp_path / "d.qcow2", tmp_path / "vars.fd", tmp_path / "console.log"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", baked_image.image, disk],
        check=True, capture_output=True,
    )  # fmt: skip
    shutil.copyfile(firmware.vars_template, vars_)
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-cpu", "max", "-m", "1024",
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={firmware.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_}",
        "-drive", f"file={disk},if=virtio,format=qcow2",
        "-netdev", "user,id=n0,restrict=on", "-device", "virtio-net-pci,netdev=n0",
    ]  # fmt: skip
    errors = tmp_path / "qemu.err"
    with errors.open("wb") as err:
        vm = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600
        text = ""
        while "Run /init as init process" not in text:
            assert vm.poll() is None, f"QEMU exited: {errors.read_text()}"
            if time.monotonic() > deadline:
                pytest.fail("no kernel under UEFI; console tail:\n" + text[-2000:])
            time.sleep(2)
            text = console.read_text(errors="replace") if console.exists() else ""
        assert "efi: EFI v" in text
    finally:
        vm.kill()
        vm.wait()
