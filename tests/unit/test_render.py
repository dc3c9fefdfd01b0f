"""Rendering the Packer HCL2: qemuargs per target, variable values, and the rendered
files parsed back with python-hcl2."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest
from hcl2.utils import SerializationOptions

from imagefactory.bake import artifacts
from imagefactory.bake import render as r
from imagefactory.host.firmware import Firmware
from imagefactory.targets import TARGETS, Target, get_target

X86 = get_target("x86_64-linux")
ARM = get_target("aarch64-linux")
FW = Firmware(Path("/fw/CODE.fd"), Path("/fw/VARS.fd"), Path("/d/60.json"))


def cfg(target: Target, build_dir: Path, accel: str = "tcg", **kw: Any) -> r.RenderConfig:
    return r.RenderConfig(target, Path("/c/base.qcow2"), "ab" * 32, build_dir, accel, FW, **kw)


NET = "user,id=user.0,restrict=on,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"


NIC = ["-device", "virtio-net,netdev=user.0"]
SCSI = ["-device", "virtio-scsi-pci,id=scsi0"]
CD = ["-device", "scsi-cd,bus=scsi0.0,drive=cdrom0"]
SERIAL = ["-serial", "file:/b/console.log"]


@pytest.mark.parametrize(
    ("target", "accel", "expected"),
    [
        (X86, "tcg", [["-cpu", "max"], ["-netdev", NET], NIC, SCSI, CD, SERIAL]),
        (X86, "kvm", [["-cpu", "host"], ["-netdev", NET], NIC, SCSI, CD, SERIAL]),
        (ARM, "tcg", [["-cpu", "max,pauth-impdef=on"], ["-netdev", NET], NIC, SCSI, CD, SERIAL,
                      ["-bios", "/fw/CODE.fd"], ["-boot", "strict=off"]]),
    ],
)  # fmt: skip
def test_qemuargs_table(target: Target, accel: str, expected: list[list[str]]) -> None:
    assert r.qemuargs(cfg(target, Path("/b"), accel)) == expected


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_qemuargs_never_replace_packer_drives(target: Target) -> None:
    args = r.qemuargs(cfg(target, Path("/b")))
    assert all(group[0] != "-drive" for group in args)
    netdev = next(group[1] for group in args if group[0] == "-netdev")
    assert "restrict=on" in netdev and "hostfwd=tcp:127.0.0.1:" in netdev


def test_uefi_target_without_firmware_is_refused() -> None:
    no_fw = r.RenderConfig(ARM, Path("/c"), "", Path("/b"), "tcg", None)
    with pytest.raises(ValueError, match="UEFI"):
        r.qemuargs(no_fw)


def test_split_args() -> None:
    assert r.split_args(["-boot", "strict=off", "-S", "-a", "1", "2"]) == [
        ["-boot", "strict=off"], ["-S"], ["-a", "1", "2"],
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("plain", '"plain"'),
        ('q"uote\\', '"q\\"uote\\\\"'),
        ("${not_interp} %{x}", '"$${not_interp} %%{x}"'),
        ("{{ .SSHHostPort }}", '"{{ .SSHHostPort }}"'),
        (3, "3"),
        (True, "true"),
        ([["a"], []], '[["a"], []]'),
    ],
)
def test_hcl_value(value: object, literal: str) -> None:
    assert r.hcl_value(value) == literal


def test_per_target_output_and_name(tmp_path: Path) -> None:
    values = r.pkrvars(cfg(ARM, tmp_path / "arm", image_format="raw", disk_size="8G"))
    assert values["output_directory"] == str(tmp_path / "arm" / "packer-output")
    assert values["vm_name"] == "aarch64-linux.raw"
    assert values["format"] == "raw" and values["disk_size"] == "8G"
    assert values["base_checksum"] == "sha256:" + "ab" * 32
    assert values["machine_type"] == "virt" and values["qemu_binary"] == "qemu-system-aarch64"
    unbuilt = r.RenderConfig(X86, Path("/c"), "", tmp_path, "tcg", None)
    assert r.pkrvars(unbuilt)["base_checksum"] == "none"
    assert r.pkrvars(unbuilt)["disk_size"] == X86.disk_size


@pytest.fixture
def rendered(tmp_path: Path) -> Path:
    return r.render(cfg(X86, tmp_path), (1, 6, 6))


def _load(path: Path) -> dict[str, Any]:
    options = SerializationOptions(
        with_comments=False, explicit_blocks=False, strip_string_quotes=True
    )
    with path.open() as f:
        doc: dict[str, Any] = hcl2.load(f, serialization_options=options)
    return doc


def test_rendered_source_block(rendered: Path) -> None:
    doc = _load(rendered / "fleetbake.pkr.hcl")
    source = doc["source"][0]["qemu"]["fleetbake"]
    assert source["disk_image"] is True
    assert source["cd_label"] == "cidata"
    assert source["cd_files"] == "${var.seed_files}"
    assert source["qemuargs"] == "${var.qemuargs}"
    assert source["output_directory"] == "${var.output_directory}"
    assert source["vm_name"] == "${var.vm_name}"
    assert source["communicator"] == "ssh"
    assert "seal" in source["shutdown_command"]


def test_rendered_build_block(rendered: Path) -> None:
    build = _load(rendered / "fleetbake.pkr.hcl")["build"][0]
    assert build["sources"] == ["source.qemu.fleetbake"]
    kinds = [next(iter(p)) for p in build["provisioner"]]
    assert kinds == ["shell", "file", "file", "shell", "file", "file"]
    assert build["provisioner"][-1]["file"]["direction"] == "download"


def test_provision_gets_the_guest_paths_of_artifacts(rendered: Path) -> None:
    build = _load(rendered / "fleetbake.pkr.hcl")["build"][0]
    (provision,) = [p["shell"] for p in build["provisioner"] if "script" in p.get("shell", {})]
    assert provision["script"].endswith("/provision.sh")
    assert provision["environment_vars"] == "${var.provision_env}"
    values = _load(rendered / r.VARS_FILE)["provision_env"]
    assert values == [f"{k}={v}" for k, v in artifacts.provision_env().items()]
    assert "FLEETBAKE_LIB=" + artifacts.GUEST_LIB in values


def test_provision_script_names_no_guest_path_itself() -> None:
    """One source of truth: the script uses exactly the variables it is given, and spells
    none of the paths they carry."""
    script = (r.PACKER_SOURCES / "scripts" / "provision.sh").read_text()
    used = set(re.findall(r"\$\{?(FLEETBAKE_[A-Z_]+)", script))
    assert used == set(artifacts.provision_env())
    for value in artifacts.provision_env().values():
        if value.startswith("/"):
            assert value not in script
    syntax = subprocess.run(["sh", "-n", str(r.PACKER_SOURCES / "scripts" / "provision.sh")])
    assert syntax.returncode == 0


def test_the_unit_runs_the_agent_unprivileged_and_sandboxed() -> None:
    unit = artifacts.executor_unit("ab" * 32).splitlines()
    for setting in (
        f"User={artifacts.GUEST_USER}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "StateDirectory=executor",  # /var/lib/executor, the agent's default state directory
    ):
        assert setting in unit
    assert artifacts.GUEST_STATE_DIR == "/var/lib/executor"
    # Power-off is systemd's (as root), not the unprivileged agent's.
    assert "Environment=EXECUTOR_POWEROFF_COMMAND=true" in unit
    [stop] = [line for line in unit if line.startswith("ExecStopPost=")]
    assert stop.startswith("ExecStopPost=+/bin/sh -c ")
    assert "$$EXECUTOR_ON_COMPLETE" in stop and "systemctl --no-block poweroff" in stop


def test_unit_and_launcher_name_the_same_guest_paths() -> None:
    unit = artifacts.executor_unit("ab" * 32)
    assert f"EXECUTOR_PIPELINE={artifacts.GUEST_PIPELINE}\n" in unit
    assert f"ExecStart={artifacts.GUEST_LAUNCHER} agent\n" in unit
    assert f"EnvironmentFile=-{artifacts.GUEST_NODE_ENV}\n" in unit
    assert f"(library in {artifacts.GUEST_LIB})" in artifacts.launcher(artifacts.VENV_PYTHON)
    assert str(Path(artifacts.GUEST_NODE_ENV).parent) in artifacts.provision_env().values()


def test_rendered_variables_are_all_declared_and_set(rendered: Path) -> None:
    declared = {next(iter(v)) for v in _load(rendered / "variables.pkr.hcl")["variable"]}
    values = _load(rendered / r.VARS_FILE)
    assert set(values) <= declared
    required = {
        name for v in _load(rendered / "variables.pkr.hcl")["variable"]
        for name, body in v.items() if "default" not in body
    }  # fmt: skip
    assert required <= set(values)
    assert values["qemuargs"][1] == ["-netdev", NET]


def test_render_writes_the_build_seed_and_key(rendered: Path) -> None:
    build_dir = rendered.parent
    public = (build_dir / "build_key.pub").read_text()
    assert public.startswith("ssh-ed25519 ")
    user_data = (build_dir / "seed" / "user-data").read_text()
    assert user_data.startswith("#cloud-config\n")
    assert public.strip() in user_data
    assert "instance-id: fleetbake-build-" in (build_dir / "seed" / "meta-data").read_text()
    assert (rendered / "scripts" / "seal.sh").is_file()


def test_required_plugins_only_for_packer_1_7_and_later(tmp_path: Path) -> None:
    old = r.render(cfg(X86, tmp_path / "old"), (1, 6, 6))
    new = r.render(cfg(X86, tmp_path / "new"), (1, 10, 0))
    assert not (old / r.PLUGINS_FILE).exists()
    plugins = _load(new / r.PLUGINS_FILE)["packer"][0]["required_plugins"][0]
    assert plugins["qemu"]["source"] == "github.com/hashicorp/qemu"
