"""Byte-compiling a base once: py3compile's stand-in records calls, the replay runs them."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imagefactory.bake import base, guestconfig, hosttools, pycompile
from imagefactory.targets import get_target

HOSTILE_ARGS = ["-p", "python3-yaml:arm64", "/usr/share/my dir/", "it's", "a\nb", "", "-X", "^x$"]


def _standin(tmp_path: Path, installed: bool) -> tuple[Path, Path]:
    """The stand-in with its guest paths moved under tmp_path; (script, queue)."""
    queue, real = tmp_path / "queue", tmp_path / "py3compile.distrib"
    if installed:
        real.write_text("")
    text = pycompile.STANDIN.replace(pycompile.QUEUE, str(queue))
    text = text.replace(f"{pycompile.PY3COMPILE}.distrib", str(real))
    script = tmp_path / "py3compile"
    script.write_text(text)
    script.chmod(0o755)
    return script, queue


def test_the_standin_records_every_argument_exactly(tmp_path: Path) -> None:
    script, queue = _standin(tmp_path, installed=True)
    calls = [HOSTILE_ARGS, ["-p", "cloud-init"], []]
    for args in calls:
        subprocess.run(["/bin/sh", script, *args], check=True)
    assert pycompile.parse_queue(queue.read_bytes()) == calls


def test_the_standin_does_nothing_before_python3_is_unpacked(tmp_path: Path) -> None:
    """The postinsts ask `command -v py3compile` first: until the real one is unpacked
    they would not have compiled anything, so neither is anything recorded."""
    script, queue = _standin(tmp_path, installed=False)
    done = subprocess.run(["/bin/sh", script, "-p", "python3-minimal", "/usr/share/python3/"])
    assert done.returncode == 0 and not queue.exists()


@pytest.mark.parametrize(
    "data",
    [b"2\0-p\0", b"x\0-p\0", b"3\0-p\0a\0", b"1\0-p"],
    ids=["short", "not-a-count", "count-too-big", "unterminated"],
)
def test_a_damaged_queue_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match="py3compile queue"):
        pycompile.parse_queue(data)


def test_an_empty_queue_has_no_calls() -> None:
    assert pycompile.parse_queue(b"") == []


def test_the_replay_runs_each_call_in_order_with_its_arguments(tmp_path: Path) -> None:
    """The replay script, run by a real shell against a py3compile that logs its argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    logger = bindir / "py3compile"
    logger.write_text(
        f'#!/bin/sh\nprintf \'%s\\0\' "$#" "$@" >> {tmp_path}/log\numask >> {tmp_path}/umask\n'
    )
    logger.chmod(0o755)
    calls = [["-p", "python3-six"], HOSTILE_ARGS]
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", pycompile.replay_script(calls)], env=env, check=True)
    assert pycompile.parse_queue((tmp_path / "log").read_bytes()) == calls
    assert (tmp_path / "umask").read_text().split() == ["0022", "0022"]  # as dpkg runs them


def test_the_replay_stops_at_the_first_failing_call(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "py3compile").write_text(f'#!/bin/sh\necho "$2" >> {tmp_path}/log\n[ "$2" != bad ]\n')
    (bindir / "py3compile").chmod(0o755)
    script = pycompile.replay_script([["-p", "bad"], ["-p", "after"]])
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    assert subprocess.run(["/bin/sh", "-c", script], env=env).returncode != 0
    assert (tmp_path / "log").read_text() == "bad\n"


def test_the_interpreters_are_the_versioned_binaries_only(tmp_path: Path) -> None:
    bindir = tmp_path / "usr/bin"
    bindir.mkdir(parents=True)
    for name in ("python3.11", "python3.11-config", "python3.13", "pythonx"):
        (bindir / name).write_text("")
    (bindir / "python3").symlink_to("python3.11")
    (bindir / "python3.12").symlink_to("python3.11")
    assert pycompile.interpreters(tmp_path) == ["/usr/bin/python3.11", "/usr/bin/python3.13"]


def test_a_foreign_target_with_another_python_compiles_in_the_chroot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/lib").mkdir()
    (tmp_path / "tmp").mkdir()  # the mount points' parents: only the versions differ
    (tmp_path / "usr/bin/python3.11").write_text("")
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    (tmp_path / "var/lib/dpkg/status").write_text(
        "Package: python3.11-minimal\nStatus: install ok installed\nVersion: 3.11.2-6+deb12u9\n"
    )
    monkeypatch.setattr(hosttools, "host_version", lambda package: "3.11.2-6+deb12u6")
    binds, reasons = pycompile.native_binds(tmp_path, pycompile.interpreters(tmp_path))
    assert reasons == ["host python3.11-minimal 3.11.2-6+deb12u6, target's 3.11.2-6+deb12u9"]
    assert binds == []
    (tmp_path / "usr/bin/python3.11").unlink()
    assert pycompile.native_binds(tmp_path, pycompile.interpreters(tmp_path)) == (
        [],
        ["the target has no python3.X"],
    )


def test_the_hooks_record_then_replay_around_the_setup_script(tmp_path: Path) -> None:
    arm, x86 = get_target("aarch64-linux"), get_target("x86_64-linux")
    argv = base.mmdebstrap_argv(base.BaseSpec(arm), tmp_path / "r", tmp_path / "ov", ["m"])
    hooks = [a for a in argv if a.startswith(("--essential-hook=", "--customize-hook="))]
    divert = f'chroot "$1" dpkg-divert --quiet --local --rename --add {pycompile.PY3COMPILE}'
    assert hooks[0].endswith(divert)  # diverted first, so the stand-in is not renamed away
    assert hooks[1] == f"--essential-hook=sync-in {tmp_path / 'standins'} /"
    assert hooks[-2] == '--customize-hook=chroot "$1" /bin/sh /fleetbake-setup.sh'
    assert hooks[-1].endswith(' -m imagefactory.bake.finish "$1" foreign')
    assert base.finish_hook(x86).endswith('"$1" native')
    script = guestconfig.setup_script(arm).splitlines()
    assert script.index(f"rm -f {pycompile.PY3COMPILE}") < script.index(
        f"dpkg-divert --quiet --local --rename --remove {pycompile.PY3COMPILE}"
    )
    inputs = base.base_inputs(base.BaseSpec(arm, mirror="http://m"))
    assert inputs["standins"] == {pycompile.PY3COMPILE: pycompile.STANDIN}
    assert inputs["recipe"] == base.BASE_RECIPE == 4


def test_stand_ins_are_written_executable(tmp_path: Path) -> None:
    base.write_overlay(tmp_path, guestconfig.RECORDED_TOOLS, mode=0o755)
    standin = tmp_path / pycompile.PY3COMPILE.lstrip("/")
    assert standin.read_text() == pycompile.STANDIN
    assert standin.stat().st_mode & 0o777 == 0o755
