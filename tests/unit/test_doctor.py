"""Host checks name the package to install; bake's pre-flight stops with the doctor hint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagefactory.cli.main import main
from imagefactory.errors import UserError
from imagefactory.host import doctor
from imagefactory.targets import get_target

X86 = get_target("x86_64-linux")


@pytest.fixture
def no_kvm_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "kvm_status", lambda t: (False, "test: no KVM"))


def test_missing_tool_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "which", lambda p: None)
    check = doctor.tool_check("mmdebstrap", "mmdebstrap")
    assert (check.ok, check.package) == (False, "mmdebstrap")


def test_binfmt_for_foreign_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "BINFMT_DIR", tmp_path)
    arm = get_target("aarch64-linux")
    if arm.is_native:
        pytest.skip("aarch64 host")
    assert doctor.binfmt_check(arm).ok is False
    assert doctor.binfmt_check(arm).package == "qemu-user-static"
    (tmp_path / "status").write_text("enabled\n")
    (tmp_path / "qemu-aarch64").write_text("enabled\ninterpreter /usr/libexec/qemu-binfmt/x\n")
    assert doctor.binfmt_check(arm).ok is True
    assert doctor.binfmt_check(X86).ok is True  # native


def test_kvm_is_not_required(no_kvm_probe: None) -> None:
    kvm = next(c for c in doctor.target_checks(X86) if c.name == "kvm x86_64")
    assert kvm.ok is False and kvm.required is False
    assert "using TCG" in kvm.detail
    assert kvm not in doctor.problems(doctor.target_checks(X86))


def test_require_stops_with_the_doctor_hint(
    monkeypatch: pytest.MonkeyPatch, no_kvm_probe: None
) -> None:
    monkeypatch.setattr(doctor, "which", lambda p: None if p == "xorriso" else Path("/bin/x"))
    monkeypatch.setattr(doctor, "run", lambda *a, **k: type("P", (), {"stdout": "Packer v1"})())
    with pytest.raises(UserError) as info:
        doctor.require(X86)
    message = info.value.format_message()
    assert "xorriso (apt install xorriso)" in message
    assert "imagefactory doctor" in message


def test_doctor_command_exit_code(monkeypatch: pytest.MonkeyPatch, no_kvm_probe: None) -> None:
    monkeypatch.setattr(doctor, "which", lambda p: None if p == "packer" else Path("/bin/x"))
    result = CliRunner().invoke(main, ["doctor"])
    assert result.exit_code == 1
    assert "MISSING" in result.output and "apt install packer" in result.output


def test_doctor_on_this_host_lists_every_check(no_kvm_probe: None) -> None:
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code in (0, 1)
    names = {c["name"] for c in json.loads(result.stdout)}
    assert {"packer", "qemu-img", "mmdebstrap", "xorriso", "kvm x86_64", "uefi aarch64"} <= names


def test_targets_command_reports_build_boot_and_accelerator(
    monkeypatch: pytest.MonkeyPatch, no_kvm_probe: None
) -> None:
    from imagefactory.host import accel

    monkeypatch.setattr(accel, "kvm_status", lambda t: (False, "test: no KVM"))
    result = CliRunner().invoke(main, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"x86_64-linux", "aarch64-linux"}
    assert rows["aarch64-linux"]["firmware"] == "uefi"
    assert {r["accelerator"] for r in rows.values()} == {"tcg"}
    monkeypatch.setattr(doctor, "which", lambda p: None)
    table = CliRunner().invoke(main, ["targets"]).output.splitlines()
    assert (
        table[0].split() == "TARGET ARCH DEBIAN MACHINE FIRMWARE CONSOLE BUILD BOOT ACCEL".split()
    )
    assert all(line.split()[6:8] == ["no", "no"] for line in table[1:])
