"""The host's binaries while a real arm64 root's packages install (bake/hostinstall.py):
mmdebstrap under qemu-user builds the same small root twice, with the hooks and without
them, and the two roots are compared file by file (scripts/compare_rootfs.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from imagefactory.bake import base, hosttools
from imagefactory.host.doctor import binfmt_check
from imagefactory.targets import get_target
from tests.scripts import load_script

ARM = get_target("aarch64-linux")
PACKAGES = "locales,cron"
"""Maintainer scripts that start shells, sed and grep, debconf's Perl frontend,
deb-systemd-helper and update-rc.d; small enough for every CI run."""

pytestmark = [
    pytest.mark.timeout(1800),  # two emulated builds on a loaded machine
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("mmdebstrap"), reason="needs root and mmdebstrap"
    ),
    pytest.mark.skipif(
        not binfmt_check(ARM).ok, reason="needs qemu-user-static in binfmt_misc (setup-host.sh)"
    ),
    pytest.mark.skipif(not base.host_sources(), reason="needs the host's Debian apt sources"),
]


def _build(root: Path, hooks: list[str]) -> str:
    """One root: mmdebstrap as base.py runs it for a foreign target, with few packages."""
    argv = [
        *base.PRIVATE_MOUNTS, "mmdebstrap", "--mode=root", "--variant=minbase",
        f"--arch={ARM.debian_arch}", "--format=directory", f"--include={PACKAGES}",
        *(f"--dpkgopt={opt}" for opt in base.DPKG_OPTIONS), *hooks,
        "bookworm", str(root), *base.mirror_args(base.BaseSpec(ARM)),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_a_root_installed_with_the_hosts_binaries_is_the_emulated_one(tmp_path: Path) -> None:
    bind, unbind = base.hostinstall_hooks(ARM, tmp_path / "state")
    log = _build(tmp_path / "host", bind + unbind)
    _build(tmp_path / "emulated", [])
    said = [line for line in log.splitlines() if "I: fleetbake:" in line]
    assert len(said) == 2, log[-3000:]
    # Nothing of the host's is left in the root, and nothing stays mounted.
    library = hosttools.library_binds(tmp_path / "host")[0][0].guest
    assert not (tmp_path / "host" / library.lstrip("/")).exists()
    assert not (tmp_path / "host/tmp/fleetbake-ld.so").exists()
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()
    compare = load_script("compare_rootfs")
    old, new = compare.manifest(tmp_path / "emulated", []), compare.manifest(tmp_path / "host", [])
    assert compare.differences(old, new) == {"only_old": [], "only_new": [], "changed": []}
    assert compare.packages(tmp_path / "emulated") == compare.packages(tmp_path / "host")
    assert "locales:all" in compare.packages(tmp_path / "host")
    if "the packages install emulated" in said[0]:
        pytest.skip(f"the host's binaries are not the target's versions here: {said[0]}")
    assert "I: fleetbake: the packages install with" in said[0]
    assert "binds of the host's files removed" in said[1]
