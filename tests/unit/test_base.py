"""Base image recipe: packages, mmdebstrap argv, cache key, guest files, disk layout."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import pytest
import yaml

from imagefactory.bake import artifacts, base, bootdisk, guestconfig
from imagefactory.bake.cache import BaseCache
from imagefactory.errors import UserError
from imagefactory.targets import TARGETS, Target, get_target

X86 = get_target("x86_64-linux")
ARM = get_target("aarch64-linux")


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_packages_cover_the_boot_chain(target: Target) -> None:
    packages = base.base_packages(target)
    for needed in ("systemd-sysv", "cloud-init", "python3", "openssh-server", "initramfs-tools"):
        assert needed in packages
    assert target.kernel_package in packages
    assert set(target.bootloader_packages) <= set(packages)


def test_mmdebstrap_argv_uses_given_mirrors_only(tmp_path: Path) -> None:
    spec = base.BaseSpec(ARM, mirror="http://mirror.example/debian")
    argv = base.mmdebstrap_argv(spec, tmp_path / "root", tmp_path / "ov", ["http://m/debian"])
    assert argv[: len(base.PRIVATE_MOUNTS) + 1] == [*base.PRIVATE_MOUNTS, "mmdebstrap"]
    assert "--arch=arm64" in argv and "--format=directory" in argv
    assert argv[-3:] == ["bookworm", str(tmp_path / "root"), "http://m/debian"]
    assert not [a for a in argv if "deb.debian.org" in a]
    include = next(a for a in argv if a.startswith("--include="))
    assert "linux-image-arm64" in include and "grub-efi-arm64-bin" in include
    assert f"--customize-hook=sync-in {tmp_path / 'ov'} /" in argv


def test_mirror_option_wins_over_host_sources() -> None:
    assert base.mirror_args(base.BaseSpec(X86, mirror="http://m/debian")) == ["http://m/debian"]


def test_no_host_sources_and_no_mirror_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "host_sources", lambda: [])
    with pytest.raises(UserError, match="--mirror"):
        base.mirror_args(base.BaseSpec(X86))


def test_cache_key_follows_every_input() -> None:
    key = base.cache_key(base.base_inputs(base.BaseSpec(X86, mirror="http://a")))
    assert key == base.cache_key(base.base_inputs(base.BaseSpec(X86, mirror="http://a")))
    others = [
        base.BaseSpec(X86, mirror="http://b"),
        base.BaseSpec(ARM, mirror="http://a"),
        base.BaseSpec(X86, mirror="http://a", suite="trixie"),
        base.BaseSpec(X86, mirror="http://a", root_mib=4096),
    ]
    keys = {base.cache_key(base.base_inputs(spec)) for spec in others}
    assert key not in keys and len(keys) == len(others)


def test_root_uuid_is_derived_from_the_key() -> None:
    assert base.root_uuid("k1") == base.root_uuid("k1") != base.root_uuid("k2")


def test_cloud_init_runs_what_the_seed_needs_in_the_stage_the_agent_waits_for() -> None:
    cfg = yaml.safe_load(guestconfig.CLOUD_CFG)
    init = cfg["cloud_init_modules"]
    # node.env, hostname, the ops user, the SSH host key, the grown root filesystem.
    for module in ("write-files", "set_hostname", "users-groups", "ssh", "growpart", "resizefs"):
        assert module in init
    assert init.index("users-groups") < init.index("ssh")
    # Nothing the seed uses is left to the stages that run beside the agent.
    assert cfg["cloud_config_modules"] == ["runcmd"]
    assert "write-files-deferred" not in cfg["cloud_final_modules"]
    assert "ssh-authkey-fingerprints" not in cfg["cloud_final_modules"]
    assert cfg["datasource_list"] == ["NoCloud", "None"]


def test_a_local_mode_seed_skips_the_network_stage_and_only_that_one() -> None:
    """bootcmd's marker, touched by the init modules, is the network stage's skip condition:
    written in cloud-init-local only when that stage runs the modules (dsmode local)."""
    cfg = yaml.safe_load(guestconfig.CLOUD_CFG)
    init = cfg["cloud_init_modules"]
    assert init.index("bootcmd") < init.index("write-files")
    assert ["touch", guestconfig.INIT_MODULES_RAN] in cfg["bootcmd"]
    assert guestconfig.INIT_MODULES_RAN.startswith("/run/")  # per boot, never persisted
    dropins = {
        path: text
        for path, text in guestconfig.overlay_files(X86, "1234").items()
        if guestconfig.INIT_MODULES_RAN in text and path.endswith(".conf")
    }
    assert dropins == {
        "/etc/systemd/system/cloud-init.service.d/50-fleetbake.conf": (
            guestconfig.INIT_STAGE_DROPIN
        )
    }
    assert f"ConditionPathExists=!{guestconfig.INIT_MODULES_RAN}\n" in guestconfig.INIT_STAGE_DROPIN


def test_unit_waits_for_the_init_stage_only() -> None:
    unit = artifacts.executor_unit("ab" * 32).split("[Service]")[0].splitlines()
    assert "After=cloud-init.service network-online.target" in unit
    assert "Wants=cloud-init.service network-online.target" in unit
    assert not any("cloud-config" in line or "cloud-final" in line for line in unit)


def test_guest_files_boot_on_the_serial_console_with_nocloud_only() -> None:
    files = guestconfig.overlay_files(ARM, "1234")
    assert "datasource_list: [NoCloud, None]" in files["/etc/cloud/cloud.cfg.d/90-fleetbake.cfg"]
    assert "PasswordAuthentication no" in files["/etc/ssh/sshd_config.d/50-fleetbake.conf"]
    assert "MODULES=list" in files["/etc/initramfs-tools/conf.d/fleetbake.conf"]
    assert "virtio_mmio" in files["/etc/initramfs-tools/modules"].split()
    assert "grub-mkimage -O arm64-efi" in files["/fleetbake-setup.sh"]
    assert "systemctl disable e2scrub_reap.service" in files["/fleetbake-setup.sh"]
    cfg = guestconfig.grub_cfg(ARM, "1234", "6.1.0-9-arm64")
    assert "linux /boot/vmlinuz-6.1.0-9-arm64 root=UUID=1234 ro" in cfg
    assert cfg.index("console=tty0") < cfg.index("console=ttyAMA0")


def test_x86_gets_bios_and_uefi_loaders() -> None:
    script = guestconfig.setup_script(X86)
    assert "-O i386-pc" in script and "boot.img" in script and "-O x86_64-efi" in script


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: t.name)
def test_deferred_tools_are_true_while_installing_then_run_once(target: Target) -> None:
    hook = base.divert_deferred_tools()
    script = guestconfig.setup_script(target).splitlines()
    assert len(guestconfig.DEFERRED_TOOLS) == 2
    for tool, command in guestconfig.DEFERRED_TOOLS.items():
        assert f"dpkg-divert --quiet --local --rename --add {tool}" in hook
        assert f'ln -s /bin/true "$1{tool}"' in hook
        # The setup script removes the stand-in and brings the real tool back; the finishing
        # hook after it (bake/finish.py) runs the tool, once.
        remove = script.index(f"rm -f {tool}")
        assert remove < script.index(f"dpkg-divert --quiet --local --rename --remove {tool}")
        assert not any(command in line for line in script)
    argv = base.mmdebstrap_argv(base.BaseSpec(target), Path("r"), Path("o"), ["m"])
    assert f"--essential-hook={hook}" in argv
    setup = argv.index('--customize-hook=chroot "$1" /bin/sh /fleetbake-setup.sh')
    assert setup + 1 == argv.index(f"--customize-hook={base.finish_hook(target)}")


def test_the_initramfs_checks_the_root_so_systemd_need_not() -> None:
    conf = guestconfig.overlay_files(X86, "u")["/etc/initramfs-tools/conf.d/fleetbake.conf"]
    assert conf.splitlines() == ["MODULES=list", "COMPRESS=zstd", "FSTYPE=ext4"]
    assert guestconfig.fstab("u").split()[-1] == "1"  # the root is still checked at boot


def test_later_cloud_init_stages_yield_the_cpu_to_the_agent_and_keep_their_order() -> None:
    files = guestconfig.overlay_files(ARM, "u")
    dropins = {k: v for k, v in files.items() if "Nice=" in v}
    assert sorted(dropins) == [
        "/etc/systemd/system/cloud-config.service.d/50-fleetbake.conf",
        "/etc/systemd/system/cloud-final.service.d/50-fleetbake.conf",
    ]
    for text in dropins.values():
        settings = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        assert settings == ["[Service]", "Nice=10"]


def test_layout_puts_root_last_after_bios_and_esp() -> None:
    layout = bootdisk.Layout(root_mib=2048)
    assert layout.root_start == 4096 + 65536
    assert layout.total_bytes == (layout.root_start + 2048 * 2048 + 2048) * 512
    script = layout.sfdisk_script()
    assert script.startswith("label: gpt")
    assert f"type={bootdisk.BIOS_BOOT_TYPE}" in script and f"type={bootdisk.ESP_TYPE}" in script
    assert f"start={layout.root_start}, size={2048 * 2048}" in script


def test_boot_img_keeps_the_partition_table_and_points_at_core() -> None:
    boot = bytes(range(256)) * 2
    mbr = b"\xaa" * 510 + b"\x55\xaa"
    out = bootdisk.patch_boot_img(boot, mbr, core_sector=2048)
    assert out[440:] == mbr[440:]  # disk signature, partition table, 0x55AA
    assert struct.unpack_from("<Q", out, 0x5C)[0] == 2048
    assert out[0x66:0x68] == b"\x90\x90"
    assert out[:0x5C] == boot[:0x5C]


def test_core_img_block_list_covers_the_rest_of_core() -> None:
    core = b"\x01" * (512 * 3 + 100)  # 4 sectors once padded
    out = bootdisk.patch_core_img(core, core_sector=2048)
    assert len(out) == 4 * 512
    assert struct.unpack_from("<QHH", out, 500) == (2049, 3, 0x820)


def test_core_img_too_big_for_the_bios_partition(tmp_path: Path) -> None:
    disk = tmp_path / "d"
    disk.write_bytes(b"\0" * 1024)
    with pytest.raises(ValueError, match="does not fit"):
        bootdisk.install_bios_grub(disk, bootdisk.Layout(1), b"\0" * 512, b"\0" * (2 * 1024**2))


def test_cache_entry_appears_only_when_complete(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path)
    with pytest.raises(RuntimeError), cache.building("k1", {"arch": "amd64"}) as work:
        (work / "base.qcow2").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert cache.lookup("k1") is None and cache.entries() == []
    with cache.building("k1", {"arch": "amd64"}) as work:
        (work / "base.qcow2").write_bytes(b"x")
        (work / "rootfs").mkdir()
    entry = cache.lookup("k1")
    assert entry is not None and entry.inputs == {"arch": "amd64"}
    assert sorted(p.name for p in entry.path.iterdir()) == [
        "base.qcow2", "base.qcow2.sha256", "inputs.json",
    ]  # fmt: skip
    assert entry.sha256 == "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881"
    assert [p.name for p in cache.dir.iterdir()] == ["k1"]


def test_a_concurrent_build_of_the_same_key_keeps_the_first_entry(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path)
    with cache.building("k", {"n": 1}) as first:
        (first / "base.qcow2").write_bytes(b"first")
        with cache.building("k", {"n": 2}) as second:
            (second / "base.qcow2").write_bytes(b"second")
    entry = cache.lookup("k")
    assert entry is not None and entry.image.read_bytes() == b"second"
    assert [p.name for p in cache.dir.iterdir()] == ["k"]


def test_prune_keeps_the_most_recently_used(tmp_path: Path) -> None:
    cache = BaseCache(tmp_path)
    for i, key in enumerate(["old", "mid", "new"]):
        with cache.building(key, {}) as work:
            (work / "base.qcow2").write_bytes(b"x")
        stamp = time.time() - 3600 * (3 - i)
        os.utime(cache.dir / key, (stamp, stamp))
    assert [e.key for e in cache.prune(keep=2)] == ["old"]
    assert [e.key for e in cache.prune(older_than_s=2.5 * 3600)] == []
    assert [e.key for e in cache.prune(older_than_s=1.5 * 3600)] == ["mid"]
    assert [e.key for e in cache.prune()] == ["new"]


def test_cache_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from imagefactory.cli.main import main

    monkeypatch.setenv("IMAGEFACTORY_CACHE", str(tmp_path))
    runner = CliRunner()
    assert "no cached base images" in runner.invoke(main, ["cache", "list"]).output
    with BaseCache(tmp_path).building("ab" * 32, {"arch": "arm64", "suite": "bookworm"}) as w:
        (w / "base.qcow2").write_bytes(b"x" * 1000)
    listing = runner.invoke(main, ["cache", "list"]).output
    assert "abababababab  arm64  bookworm" in listing
    assert runner.invoke(main, ["cache", "prune", "--keep", "1"]).output.endswith(
        "0 entries removed\n"
    )
    pruned = runner.invoke(main, ["cache", "prune"])
    assert pruned.exit_code == 0 and "removed abababababab" in pruned.output
    assert runner.invoke(main, ["cache", "list", "--json"]).output.strip() == "[]"
    bad = runner.invoke(main, ["cache", "prune", "--keep", "-1"])
    assert bad.exit_code == 2
