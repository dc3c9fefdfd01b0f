"""The KVM probe: its guest and argv, the fallback to TCG, and its caches."""

from __future__ import annotations

from pathlib import Path

import pytest

from imagefactory.host import accel
from imagefactory.targets import get_target

X86 = get_target("x86_64-linux")
ARM = get_target("aarch64-linux")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEFACTORY_CACHE", str(tmp_path))
    accel.kvm_status.cache_clear()


def test_probe_guest_is_one_boot_sector() -> None:
    assert len(accel.PROBE_SECTOR) == 512
    assert accel.PROBE_SECTOR.endswith(b"\x55\xaa")
    assert accel.PROBE_EXIT_CODE == 0x43


def test_probe_argv_uses_the_targets_machine_and_kvm_cpu(tmp_path: Path) -> None:
    argv = accel.probe_argv("qemu-system-x86_64", X86, tmp_path / "p.img")
    assert argv[:3] == ["qemu-system-x86_64", "-accel", "kvm"]
    assert argv[argv.index("-machine") + 1] == "q35"
    assert argv[argv.index("-cpu") + 1] == "host"
    assert "isa-debug-exit,iobase=0xf4,iosize=0x04" in argv
    assert f"file={tmp_path / 'p.img'},format=raw,if=ide" in argv
    assert "-netdev" not in argv and "-nic" not in argv  # no network at all (-nodefaults)


def test_foreign_architecture_uses_tcg_without_probing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "run", lambda *a, **k: pytest.fail("probed a foreign target"))
    if ARM.is_native:
        pytest.skip("aarch64 host")
    assert accel.kvm_works(ARM)[0] is False
    assert accel.pick_accelerator(ARM) == "tcg"


def test_result_is_cached_in_process_and_on_disk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls = []

    def fake(target: object) -> tuple[bool, str]:
        calls.append(target)
        return False, "a KVM guest did not boot: failed to set MSR"

    monkeypatch.setattr(accel, "kvm_works", fake)
    assert accel.pick_accelerator(X86) == "tcg"
    assert accel.pick_accelerator(X86) == "tcg"
    assert len(calls) == 1
    assert (tmp_path / "accel.json").is_file()
    accel.kvm_status.cache_clear()
    assert accel.kvm_status(X86) == (False, "a KVM guest did not boot: failed to set MSR")
    assert len(calls) == 1  # answered from the disk cache


def test_working_kvm_is_picked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_works", lambda t: (True, "a KVM guest booted"))
    assert accel.pick_accelerator(X86) == "kvm"


@pytest.mark.skipif(not Path("/dev/kvm").exists(), reason="no /dev/kvm")
def test_real_probe_gives_an_answer_with_a_reason() -> None:
    works, reason = accel.kvm_works(X86)
    assert reason.startswith("a KVM guest") or "not" in reason
    assert accel.pick_accelerator(X86) == ("kvm" if works else "tcg")
