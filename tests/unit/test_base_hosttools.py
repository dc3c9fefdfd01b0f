"""The host's binaries in a chroot (bake/hosttools.py): which, how, and a real run."""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path

import pytest

from imagefactory.bake import hosttools
from imagefactory.run import CommandError

STATUS = """\
Package: sed
Status: install ok installed
Architecture: arm64
Version: 4.9-1+deb12u1

Package: python3.12-minimal
Status: deinstall ok config-files
Version: 3.12.1-1

Package: libfoo
Status: install ok installed
Description: has: colons: in it
Version: 1.0
"""


def test_installed_version_reads_dpkg_status() -> None:
    assert hosttools.installed_version(STATUS, "sed") == "4.9-1+deb12u1"
    assert hosttools.installed_version(STATUS, "python3.12-minimal") is None  # config-files
    assert hosttools.installed_version(STATUS, "python3.13-minimal") is None
    assert hosttools.installed_version(STATUS, "libfoo") == "1.0"


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/bin/sed", "/usr/bin/sed"), ("/sbin/x", "/usr/sbin/x"), ("/usr/bin/a", "/usr/bin/a"),
     ("/lib/y.so", "/usr/lib/y.so"), ("/binx/z", "/binx/z")],
)  # fmt: skip
def test_merged_usr_paths(path: str, expected: str) -> None:
    assert hosttools.merged(path) == expected


def test_a_symlink_never_takes_a_path_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/real").write_text("")
    (root / "usr/bin/escape").symlink_to("/usr/bin/sed")
    (root / "bin").symlink_to("usr/bin")
    assert hosttools.inside(root, "/usr/bin/real") == root / "usr/bin/real"
    assert hosttools.inside(root, "/usr/bin/escape") is None
    assert hosttools.inside(root, "/bin/real") is None  # through a symlink: use merged()
    assert hosttools.inside(root, "/usr/bin/missing") is None


def test_package_tools_are_plain_executables_on_both_sides(tmp_path: Path) -> None:
    """Guest path = host path; only /usr/bin and /usr/sbin; no symlinks; executable."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    for name, mode in (("sed", 0o755), ("true", 0o644), ("no-such-host-tool", 0o755)):
        (root / "usr/bin" / name).write_text("")
        (root / "usr/bin" / name).chmod(mode)
    (root / "usr/bin/sh").symlink_to("dash")
    listing = "/.\n/bin\n/bin/sed\n/usr/bin/true\n/usr/bin/sh\n/usr/bin/no-such-host-tool\n"
    listing += "/usr/share/doc/sed/copyright\n/bin/sed\n"
    binds = hosttools.package_tools(root, "sed", listing)
    assert binds == [hosttools.Bind(Path("/usr/bin/sed"), "/usr/bin/sed")]


@pytest.mark.skipif(not Path("/usr/bin/uname").is_file(), reason="needs coreutils")
def test_tools_that_name_the_machine_stay_the_targets(tmp_path: Path) -> None:
    """Under qemu-user `uname -m` says aarch64; the host's would say x86_64."""
    (tmp_path / "usr/bin").mkdir(parents=True)
    for name in ("uname", "arch", "cat"):
        (tmp_path / "usr/bin" / name).write_text("")
        (tmp_path / "usr/bin" / name).chmod(0o755)
    listing = "/bin/uname\n/usr/bin/arch\n/bin/cat\n"
    guests = [b.guest for b in hosttools.package_tools(tmp_path, "coreutils", listing)]
    assert guests == ["/usr/bin/cat"]
    assert {"/usr/bin/uname", "/usr/bin/arch"} == hosttools.MACHINE_TOOLS


def test_dpkg_list_finds_arch_qualified_lists(tmp_path: Path) -> None:
    info = tmp_path / "var/lib/dpkg/info"
    info.mkdir(parents=True)
    (info / "libc6:arm64.list").write_text("/usr/lib/x\n")
    (info / "sed.list").write_text("/bin/sed\n")
    assert hosttools.dpkg_list(tmp_path, "libc6") == "/usr/lib/x\n"
    assert hosttools.dpkg_list(tmp_path, "sed") == "/bin/sed\n"
    assert hosttools.dpkg_list(tmp_path, "absent") == ""


def test_only_packages_at_the_same_version_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(STATUS)
    host = {"sed": "4.9-1", "libfoo": "1.0"}
    monkeypatch.setattr(hosttools, "host_version", host.get)
    same, reasons = hosttools.same_packages(tmp_path, ("sed", "libfoo", "not-in-target"))
    assert same == ["libfoo"]
    assert reasons == ["host sed 4.9-1, target's 4.9-1+deb12u1"]


def test_the_native_script_binds_probes_then_runs() -> None:
    binds = [
        hosttools.Bind(Path("/usr/lib/x86_64-linux-gnu"), "/usr/lib/x86_64-linux-gnu"),
        hosttools.Bind(Path("/usr/bin/sed"), "/usr/bin/sed"),
    ]
    command = "echo 'a b'"
    script = hosttools.native_script(binds, ["/bin/sh", "-c", ":"], command)
    assert script.splitlines() == [
        "set -u",
        "marker=$2",
        'fallback() { : > "$marker"; exit 1; }',
        'mount --bind -o ro /usr/lib/x86_64-linux-gnu "$1"/usr/lib/x86_64-linux-gnu || fallback',
        'mount --bind -o ro /usr/bin/sed "$1"/usr/bin/sed || fallback',
        'chroot "$1" /bin/sh -c : || fallback',
        f'exec chroot "$1" /bin/sh -c {shlex.quote(command)}',
    ]


def _mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "chroot")),
    reason="needs root (mount namespaces, chroot)",
)
def test_a_real_run_uses_the_host_binaries_and_leaves_the_root_as_it_was(tmp_path: Path) -> None:
    """A root whose /usr/bin/dash and /usr/bin/cat are empty files: they only work as the
    host's, bind-mounted for the run; afterwards the root is exactly as before."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "tmp").mkdir()
    for name in ("dash", "cat"):
        (root / "usr/bin" / name).write_text("")
        (root / "usr/bin" / name).chmod(0o755)
    (root / "usr/bin/sh").symlink_to("dash")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")  # where the host's loader looks for libraries
    (root / "etc").mkdir()
    (root / "etc/motd").write_text("hello from the target\n")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    libs, reasons = hosttools.library_binds(root)
    assert reasons == []
    tools = [hosttools.Bind(Path(p), p) for p in ("/usr/bin/dash", "/usr/bin/cat")]
    command = "cat /etc/motd > /etc/copied; echo $$ > /etc/ran\n"
    assert hosttools.run_native(root, libs + tools, ["/usr/bin/dash", "-c", ":"], command)
    assert (root / "etc/copied").read_text() == "hello from the target\n"
    (root / "etc/copied").unlink()
    (root / "etc/ran").unlink()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    assert (root / "usr/bin/dash").read_text() == "" and str(root) not in _mounts()


@pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "chroot")),
    reason="needs root (mount namespaces, chroot)",
)
def test_the_host_files_are_read_only_and_the_commands_status_is_its_own(tmp_path: Path) -> None:
    """Nothing run in the chroot can write through a bind to the host's file; a command
    that fails (even with the status a probe failure once had) is an error, not a fallback."""
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "tmp").mkdir()
    (root / "usr/bin/dash").write_text("")
    (root / "usr/bin/dash").chmod(0o755)
    (root / "usr/bin/sh").symlink_to("dash")
    (root / "bin").symlink_to("usr/bin")
    (root / "lib").symlink_to("usr/lib")
    host_file = tmp_path / "host-tool"
    host_file.write_text("#!/bin/sh\n")
    host_file.chmod(0o755)
    (root / "usr/bin/tool").write_text("")
    libs, _ = hosttools.library_binds(root)
    binds = [*libs, hosttools.Bind(Path("/usr/bin/dash"), "/usr/bin/dash"),
             hosttools.Bind(host_file, "/usr/bin/tool")]  # fmt: skip
    probe = ["/usr/bin/dash", "-c", ":"]
    with pytest.raises(CommandError) as failed:
        hosttools.run_native(root, binds, probe, "echo overwritten > /usr/bin/tool")
    assert "Read-only file system" in failed.value.stderr
    assert host_file.read_text() == "#!/bin/sh\n"
    with pytest.raises(CommandError):
        hosttools.run_native(root, binds, probe, "exit 100")
    assert str(root) not in _mounts()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, chroot)")
def test_a_bind_that_fails_runs_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("")
    missing = hosttools.Bind(tmp_path / "no-such-host-file", "/usr/bin/tool")
    assert not hosttools.run_native(root, [missing], ["/bin/true"], "touch /ran")
    assert not (root / "ran").exists()


def test_paths_that_leave_the_root_or_are_not_regular_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/sed").write_text("")
    (tmp_path / "usr/bin/zero").symlink_to("/dev/zero")
    (tmp_path / "usr/bin/fifo").mkdir()
    for guest in ("/usr/bin/../bin/sed", "/usr/bin/./sed", "usr/bin/sed", "/", "/usr//bin/sed"):
        assert hosttools.inside(tmp_path, guest) is None, guest
    assert hosttools.target_file(tmp_path, "/usr/bin/sed") == tmp_path / "usr/bin/sed"
    assert hosttools.target_file(tmp_path, "/usr/bin/zero") is None
    assert hosttools.target_file(tmp_path, "/usr/bin/fifo") is None
    listed = "/usr/bin/../../etc/passwd\n/usr/bin/sed/../sed\n/usr/lib/x/sed\n"
    assert hosttools.package_tools(tmp_path, "sed", listed) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mount namespaces, chroot)")
def test_a_probe_that_fails_runs_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir()
    (root / "tmp").mkdir()
    (root / "usr/bin/dash").write_text("")  # no host dash bound: it cannot start
    (root / "usr/bin/dash").chmod(0o755)
    (root / "bin").symlink_to("usr/bin")
    libs, _ = hosttools.library_binds(root)
    assert not hosttools.run_native(root, libs, ["/usr/bin/dash", "-c", ":"], "touch /ran")
    assert not (root / "ran").exists()
    assert list((root / "usr/lib").iterdir()) == list((root / "tmp").iterdir()) == []


def test_a_copy_names_the_relocated_loader_as_its_interpreter() -> None:
    binary = Path(shutil.which("sed") or "/usr/bin/sed").read_bytes()
    found = hosttools.interpreter(binary)
    assert found is not None and found[2].startswith("/")
    copy = hosttools.with_interpreter(binary, hosttools.LOADER)
    assert len(copy) == len(binary)
    assert hosttools.interpreter(copy) == (found[0], found[1], hosttools.LOADER)
    with pytest.raises(ValueError, match="does not fit"):
        hosttools.with_interpreter(binary, "/" + "x" * found[1])
    script = b"#!/bin/sh\n" * 10
    assert hosttools.interpreter(script) is None
    assert hosttools.with_interpreter(script, hosttools.LOADER) == script


def test_mount_points_are_only_made_in_real_directories(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "tmp").symlink_to(tmp_path / "elsewhere")
    binds, reasons = hosttools.library_binds(root)
    assert binds and reasons == ["/tmp is not a directory in the target"]
    (root / "tmp").unlink()
    (root / "tmp").mkdir()
    assert hosttools.library_binds(root)[1] == []
