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


def _tree(root: Path) -> list[tuple[str, int, str]]:
    """Every path's name, type and mode, and a file's contents or a link's target."""
    return sorted(
        (
            str(p.relative_to(root)),
            p.lstat().st_mode,
            str(p.readlink()) if p.is_symlink() else p.read_text() if p.is_file() else "",
        )
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
    assert "I: fleetbake: 4 binds of the host's files removed" in done.stdout
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
@pytest.mark.parametrize(
    ("probes", "said"),
    [({"/usr/bin/cat": ["/usr/bin/cat", "/no-such-file"]}, "/no-such-file"),
     ({}, "none of the bound binaries has a probe")],
    ids=["fails", "none"],
)  # fmt: skip
def test_a_failed_or_missing_probe_undoes_every_mount(
    tmp_path: Path, probes: dict[str, list[str]], said: str
) -> None:
    """The library directory, the loader and both tools were bound when the probe fails
    (or when none of them has one)."""
    root, state = tmp_path / "root", tmp_path / "state"
    _fake_root(root)
    before = _tree(root)
    code = (
        "import sys; from pathlib import Path; from imagefactory.bake import hostinstall\n"
        f"hostinstall.PROBES = {probes!r}\n"
        "print(hostinstall.bind(Path(sys.argv[1]), Path(sys.argv[2])))\n"
        "print(open('/proc/self/mountinfo').read())\n"
    )
    done = subprocess.run(
        [*base.PRIVATE_MOUNTS, sys.executable, "-c", code, str(root), str(state)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    first, _, mounts = done.stdout.partition("\n")
    assert first.startswith("the packages install emulated (the host's binaries do not work")
    assert said in first
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
    assert not (tmp_path / "state/mounts.json").exists()


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert hostinstall.main(["bind", "root"]) == 2
    assert hostinstall.main(["mount", "root", "state"]) == 2
    assert "usage:" in capsys.readouterr().err


def test_unbind_never_follows_a_link_out_of_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A maintainer script replaced the root's /tmp by a link to a host directory after
    `bind`: the host's file of the same name stays, and the hook fails, saying why."""
    root, state, host_dir = tmp_path / "root", tmp_path / "state", tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "fleetbake-ld.so").write_text("the host's\n")
    root.mkdir()
    (root / "tmp").symlink_to(host_dir)
    state.mkdir()
    (state / "mounts.json").write_text('{"mounted": [], "made": ["/tmp/fleetbake-ld.so"]}')
    assert hostinstall.main(["unbind", str(root), str(state)]) == 1
    out = capsys.readouterr().out
    assert out == (
        "E: fleetbake: unbinding the host's binaries failed: /tmp/fleetbake-ld.so is no "
        "longer a plain path inside the root; left as it is\n"
    )
    assert (host_dir / "fleetbake-ld.so").read_text() == "the host's\n"


LIBRARY = f"/usr/lib/{getattr(sys.implementation, '_multiarch', 'x')}"


def _perl_root(root: Path, libperl: str | None) -> None:
    (root / "var/lib/dpkg").mkdir(parents=True)
    status = "Package: perl-base\nStatus: install ok installed\nVersion: 1\n"
    if libperl is not None:
        status += f"\nPackage: libperl5.36\nStatus: install ok installed\nVersion: {libperl}\n"
    (root / "var/lib/dpkg/status").write_text(status)


@pytest.mark.skipif(not Path(LIBRARY).is_dir(), reason="needs the host's library directory")
def test_the_hosts_perl_sees_only_modules_the_targets_perl_would(tmp_path: Path) -> None:
    library = [hosttools.Bind(Path(LIBRARY), LIBRARY)]
    empty = tmp_path / "empty"
    # No libperl in the target: the host's libperl and lib*-perl modules are hidden.
    _perl_root(tmp_path / "a", None)
    hidden = {b.guest for b in hostinstall.perl_view(tmp_path / "a", library, empty)}
    assert hidden == {f"{LIBRARY}/{d}" for d in ("perl5", "perl") if Path(LIBRARY, d).is_dir()}
    # The target's libperl at another version than the host's: Perl stays emulated.
    _perl_root(tmp_path / "b", "0.0-other")
    with pytest.raises(ValueError, match="libperl5.36"):
        hostinstall.perl_view(tmp_path / "b", library, empty)
    # Arch-specific Perl modules of the target's own: emulated too.
    _perl_root(tmp_path / "c", None)
    (tmp_path / "c/usr/lib/aarch64-linux-gnu/perl5/5.36").mkdir(parents=True)
    with pytest.raises(ValueError, match="built for its own machine"):
        hostinstall.perl_view(tmp_path / "c", library, empty)
