"""The host's binaries while a foreign base's packages install (bake/hostinstall.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imagefactory.bake import base, hostinstall, hosttools
from imagefactory.targets import get_target

ROOT_TOOLS = ("unshare", "chroot", "mount", "dpkg-query")
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ROOT_TOOLS),
    reason="needs root (mount namespaces, chroot) and dpkg",
)


def test_only_a_foreign_base_binds_between_the_essential_set_and_the_customize_hooks(
    tmp_path: Path,
) -> None:
    arm, x86 = get_target("aarch64-linux"), get_target("x86_64-linux")
    argv = base.mmdebstrap_argv(base.BaseSpec(arm), tmp_path / "r", tmp_path / "ov", ["m"])
    hooks = [a for a in argv if a.startswith(("--essential-hook=", "--customize-hook="))]
    state = tmp_path / "hostinstall"
    assert hooks[1] == f"--essential-hook=sync-in {tmp_path / 'standins'} /"
    assert hooks[2].endswith(f' -m imagefactory.bake.hostinstall bind "$1" {state}')
    # The first customize hook: the overlay, the setup script and finish.py see the
    # target's own binaries again.
    assert hooks[3].startswith("--customize-hook=")
    assert hooks[3].endswith(f' -m imagefactory.bake.hostinstall unbind "$1" {state}')
    assert argv[: len(base.PRIVATE_MOUNTS)] == list(base.PRIVATE_MOUNTS)
    native = base.mmdebstrap_argv(base.BaseSpec(x86), tmp_path / "r", tmp_path / "ov", ["m"])
    assert not [a for a in native if "hostinstall" in a]
    assert native[0] == "mmdebstrap"  # nothing mounts: no mount namespace needed


def _fake_root(root: Path) -> None:
    """A root whose dash and cat are empty files at the host's versions: they only work as
    the host's, bound in."""
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "tmp").mkdir()
    (root / "var/lib/dpkg/info").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    (root / "usr/bin/sh").symlink_to("dash")
    status = []
    for package, tool in (("dash", "dash"), ("coreutils", "cat")):
        (root / "usr/bin" / tool).write_text("")
        (root / "usr/bin" / tool).chmod(0o755)
        (root / f"var/lib/dpkg/info/{package}.list").write_text(f"/usr/bin/{tool}\n")
        version = hosttools.host_version(package)
        status.append(f"Package: {package}\nStatus: install ok installed\nVersion: {version}\n")
    (root / "var/lib/dpkg/status").write_text("\n".join(status))
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("hello from the target\n")


def _tree(root: Path) -> list[tuple[str, str]]:
    return sorted(
        (str(p.relative_to(root)), p.read_text() if p.is_file() and not p.is_symlink() else "")
        for p in root.rglob("*")
    )


def _hook(action: str, root: Path, state: Path) -> str:
    return f"{sys.executable} -m imagefactory.bake.hostinstall {action} {root} {state}"


@needs_root
def test_the_installation_between_the_hooks_runs_the_hosts_binaries(tmp_path: Path) -> None:
    """bind, then what dpkg would start runs with the host's dash and cat; unbind leaves
    the root exactly as it was (all in a private mount namespace, as mmdebstrap runs)."""
    root, state = tmp_path / "root", tmp_path / "state"
    _fake_root(root)
    before = _tree(root)
    script = " && ".join([
        _hook("bind", root, state),
        f"chroot {root} /bin/sh -c 'cat /etc/motd > /etc/copied'",
        _hook("unbind", root, state),
        f"! chroot {root} /bin/sh -c :",  # the target's own (empty) dash again
    ])  # fmt: skip
    done = subprocess.run(
        [*base.PRIVATE_MOUNTS, "sh", "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "I: fleetbake: the packages install with 2 of the host's binaries" in done.stdout
    assert "I: fleetbake: 4 of the host's files unbound" in done.stdout
    assert (root / "etc/copied").read_text() == "hello from the target\n"
    (root / "etc/copied").unlink()
    assert _tree(root) == before
    assert not (state / "mounts.json").exists()


@needs_root
def test_a_failed_bind_undoes_everything_and_the_packages_install_emulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    _fake_root(root)
    before = _tree(root)
    missing = hosttools.Bind(tmp_path / "no-such-host-file", "/usr/bin/cat")
    monkeypatch.setattr(hosttools, "tool_binds", lambda root, packages: ([missing], []))
    said = hostinstall.bind(root, state)
    assert said.startswith("the packages install emulated (the host's binaries do not work")
    assert "mount" in said
    assert _tree(root) == before
    assert hostinstall.unbind(root, state) == 0  # nothing left to undo


@needs_root
def test_a_failed_probe_undoes_every_mount(tmp_path: Path) -> None:
    """The library directory, the loader and both tools were bound when the probe fails."""
    root, state = tmp_path / "root", tmp_path / "state"
    _fake_root(root)
    before = _tree(root)
    code = (
        "import sys; from pathlib import Path; from imagefactory.bake import hostinstall\n"
        "hostinstall.PROBES = {'/usr/bin/cat': ['/usr/bin/cat', '/no-such-file']}\n"
        "print(hostinstall.bind(Path(sys.argv[1]), Path(sys.argv[2])))\n"
        "print(open('/proc/self/mountinfo').read())\n"
    )
    done = subprocess.run(
        [*base.PRIVATE_MOUNTS, sys.executable, "-c", code, str(root), str(state)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    said, _, mounts = done.stdout.partition("\n")
    assert said.startswith("the packages install emulated (the host's binaries do not work")
    assert "/no-such-file" in said
    assert str(root) not in mounts
    assert _tree(root) == before


@needs_root
def test_a_taken_library_directory_binds_nothing(tmp_path: Path) -> None:
    root, state = tmp_path / "root", tmp_path / "state"
    _fake_root(root)
    (root / "usr/lib" / getattr(sys.implementation, "_multiarch", "x")).mkdir()
    before = _tree(root)
    said = hostinstall.bind(root, state)
    assert said.startswith("the packages install emulated (")
    assert "exists in the target" in said
    assert _tree(root) == before


def test_nothing_to_bind_says_why(tmp_path: Path) -> None:
    said = hostinstall.bind(tmp_path, tmp_path / "state")
    assert said.startswith("the packages install emulated (")
    assert said.endswith("the target has no dpkg status file)")
    assert not (tmp_path / "state").exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert hostinstall.main(["bind", "root"]) == 2
    assert hostinstall.main(["mount", "root", "state"]) == 2
    assert "usage:" in capsys.readouterr().err
