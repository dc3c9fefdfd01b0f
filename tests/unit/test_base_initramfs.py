"""Reading initramfs images (bake/initramfs.py) and the finishing pass's check that no host
binary was copied into one (bake/finish.py)."""

from __future__ import annotations

import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from imagefactory.bake import finish, hosttools, initramfs

AARCH64, X86_64 = 183, 62


def elf(machine: int, big_endian: bool = False) -> bytes:
    header = bytearray(64)
    header[:4] = b"\x7fELF"
    header[4], header[5] = 2, 2 if big_endian else 1
    struct.pack_into(">H" if big_endian else "<H", header, 18, machine)
    return bytes(header) + b"code"


def newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive, as cpio -H newc writes it."""
    out = b""
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        out += header + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return out


MAIN = [
    (".", 0o40755, b""),
    ("usr/bin/kmod", 0o100755, elf(AARCH64)),
    ("usr/bin/cp", 0o100755, elf(X86_64)),
    ("init", 0o100755, b"#!/bin/sh\n"),
    ("bin", 0o120777, b"usr/bin"),
]


def zstd(data: bytes) -> bytes:
    done = subprocess.run(["zstd", "-q", "-c"], input=data, capture_output=True, check=True)
    return done.stdout


@pytest.mark.parametrize("compress", ["zstd", "gzip", "xz", "none"])
def test_files_of_an_early_archive_and_a_compressed_one(compress: str, tmp_path: Path) -> None:
    if compress == "zstd" and shutil.which("zstd") is None:
        pytest.skip("needs zstd")
    main = newc(MAIN)
    packers: dict[str, Callable[[bytes], bytes]] = {
        "zstd": zstd, "gzip": gzip.compress, "xz": lzma.compress, "none": bytes,
    }  # fmt: skip
    packed = packers[compress](main)
    early = newc([("kernel/x86/microcode/GenuineIntel.bin", 0o100644, b"\x01" * 5)])
    image = tmp_path / "initrd.img"
    image.write_bytes(early + b"\0" * 512 + packed)
    names = [name for name, _, _ in initramfs.files(image.read_bytes())]
    assert names == ["kernel/x86/microcode/GenuineIntel.bin", ".", *[e[0] for e in MAIN[1:]]]
    assert initramfs.foreign_elves(image, AARCH64) == ["usr/bin/cp"]
    assert initramfs.foreign_elves(image, X86_64) == ["usr/bin/kmod"]


def test_elf_machine_reads_either_byte_order() -> None:
    assert initramfs.elf_machine(elf(AARCH64)) == AARCH64
    assert initramfs.elf_machine(elf(22, big_endian=True)) == 22  # s390x
    assert initramfs.elf_machine(b"#!/bin/sh\n" * 4) is None
    assert initramfs.elf_machine(b"\x7fELF") is None  # too short


@pytest.mark.parametrize(
    "image",
    [b"070701" + b"0" * 20, b"BZh91AY&SY" + b"\0" * 30, newc(MAIN)[:-20]],
    ids=["cut-header", "bzip2", "cut-archive"],
)
def test_an_image_that_cannot_be_read_is_an_error(image: bytes) -> None:
    with pytest.raises(ValueError):
        list(initramfs.files(image))


def _root(tmp_path: Path, contents: list[tuple[str, int, bytes]]) -> Path:
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot/initrd.img-6.1.0-arm64").write_bytes(newc(contents))
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/dpkg").write_bytes(elf(AARCH64))
    return tmp_path


def test_the_target_machine_comes_from_its_own_dpkg(tmp_path: Path) -> None:
    root = _root(tmp_path, MAIN)
    assert finish.target_machine(root) == AARCH64
    assert finish.wrong_initramfs(root, AARCH64) == ["initrd.img-6.1.0-arm64: usr/bin/cp"]
    (root / "usr/bin/dpkg").write_text("#!/bin/sh\n")
    with pytest.raises(ValueError, match="not an ELF"):
        finish.target_machine(root)


def _fake_native(monkeypatch: pytest.MonkeyPatch, probe_ok: bool) -> list[str]:
    """hosttools with one host tool and no real mounts; returns what ran in the chroot."""
    emulated: list[str] = []
    tool = hosttools.Bind(Path("/usr/bin/sed"), "/usr/bin/sed")
    monkeypatch.setattr(hosttools, "tool_binds", lambda root, packages: ([tool], []))
    monkeypatch.setattr(hosttools, "run_native", lambda root, binds, probe, cmd: probe_ok)
    monkeypatch.setattr(hosttools, "run_in_chroot", lambda root, cmd: emulated.append(cmd))
    return emulated


def test_a_host_binary_copied_into_the_initramfs_makes_it_again_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulated = _fake_native(monkeypatch, probe_ok=True)
    how = finish.deferred_tools(_root(tmp_path, MAIN), foreign=True)
    assert emulated == ["update-initramfs -u -k all"]
    assert "made again in the chroot" in how and "usr/bin/cp" in how


def test_a_clean_initramfs_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    emulated = _fake_native(monkeypatch, probe_ok=True)
    clean = [e for e in MAIN if e[0] != "usr/bin/cp"]
    how = finish.deferred_tools(_root(tmp_path, clean), foreign=True)
    assert emulated == [] and how == "deferred tools run with 1 of the host's binaries"


def test_when_the_host_binaries_cannot_start_all_runs_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulated = _fake_native(monkeypatch, probe_ok=False)
    how = finish.deferred_tools(_root(tmp_path, MAIN), foreign=True)
    assert len(emulated) == 1 and "update-initramfs -c -k all" in emulated[0]
    assert "update-ca-certificates" in emulated[0] and "the probe failed" in how


def test_a_native_target_runs_each_deferred_tool_once_in_the_chroot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulated = _fake_native(monkeypatch, probe_ok=True)
    how = finish.deferred_tools(tmp_path, foreign=False)
    assert len(emulated) == 1 and emulated[0].startswith("set -e\n")
    for command in ("update-initramfs -c -k all", "update-ca-certificates"):
        assert sum(command in line for line in emulated[0].splitlines()) == 1
    assert how == "deferred tools run in the chroot (a native target)"


def test_finish_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert finish.main(["/r"]) == 2
    assert finish.main(["/r", "sideways"]) == 2
    assert "usage:" in capsys.readouterr().err
