"""The Packer runner: version parsing, argv and environment, stages read off the output,
and a failed build as one clear error (exercised with a stand-in `packer` script)."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagefactory.bake import packer
from imagefactory.errors import UserError
from imagefactory.stages import Stages
from tests.processes import process_alive


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Packer v1.6.6", (1, 6, 6)),
        ("1.10.0", (1, 10, 0)),
        ("Packer v1.9.4\n\nYour version", (1, 9, 4)),
    ],
)
def test_parse_version(text: str, version: tuple[int, ...]) -> None:
    assert packer.parse_version(text) == version


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        packer.parse_version("packer")


def test_argv_and_environment(tmp_path: Path) -> None:
    assert packer.build_argv(tmp_path / "hcl") == [
        "packer", "build", "-color=false", "-on-error=cleanup", str(tmp_path / "hcl"),
    ]  # fmt: skip
    assert packer.validate_argv(tmp_path) == ["packer", "validate", str(tmp_path)]
    env = packer.packer_env(tmp_path)
    assert env["CHECKPOINT_DISABLE"] == "1"
    assert env["PACKER_LOG_PATH"].startswith(str(tmp_path))


def _fake_packer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "packer"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_build_streams_stages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packer(
        tmp_path,
        monkeypatch,
        """\
test "$CHECKPOINT_DISABLE" = 1 || exit 9
echo "==> qemu.fleetbake: Starting VM, booting disk image"
echo "==> qemu.fleetbake: Connected to SSH!"
echo "    qemu.fleetbake: noise"
echo "==> qemu.fleetbake: Gracefully halting virtual machine..."
""",
    )
    (tmp_path / "hcl").mkdir()
    out = io.StringIO()
    stages = Stages(out)
    packer.build(tmp_path / "hcl", tmp_path / "packer.log", stages)
    assert list(stages.times) == ["packer", "boot", "provision", "seal"]
    assert "==> provision: installing the executor" in out.getvalue()
    assert "noise" in (tmp_path / "packer.log").read_text()
    assert "noise" not in out.getvalue()


def test_failed_build_shows_tail_and_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_packer(
        tmp_path,
        monkeypatch,
        """\
for i in $(seq 1 40); do echo "line $i"; done
echo "Build 'qemu.fleetbake' errored: Timeout waiting for SSH."
exit 1
""",
    )
    (tmp_path / "hcl").mkdir()
    with pytest.raises(UserError) as info:
        packer.build(tmp_path / "hcl", tmp_path / "packer.log", Stages(io.StringIO()))
    message = info.value.format_message()
    assert "packer build failed (exit code 1)" in message
    assert "Timeout waiting for SSH." in message
    assert "line 40" in message and "line 3\n" not in message
    assert f"full log: {tmp_path / 'packer.log'}" in message


def _booting_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packer_body: str
) -> tuple[subprocess.Popen[str], int]:
    """A bake's Packer step in a child process, once its boot stage began (the fake Packer
    has started its "VM" and written its pid): the child, and the VM's pid."""
    _fake_packer(tmp_path, monkeypatch, packer_body)
    (tmp_path / "hcl").mkdir()
    driver = (
        "import pathlib, signal, sys\n"
        # Ctrl-C as in a terminal: a test run started in the background (`... &`)
        # passes SIGINT down ignored, and Python then installs no handler for it.
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "from imagefactory.bake import packer\n"
        "from imagefactory.stages import Stages\n"
        f"packer.build(pathlib.Path({str(tmp_path / 'hcl')!r}), "
        f"pathlib.Path({str(tmp_path / 'packer.log')!r}), Stages(sys.stderr))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        # Only once the build reads Packer's output (the boot stage began), as a user
        # would: not while the driver is still inside Popen starting Packer.
        seen = ""
        while "==> boot" not in seen:
            line = proc.stderr.readline()
            assert line, f"the build ended before its boot stage: {seen}"
            seen += line
        return proc, int((tmp_path / "vm.pid").read_text())  # written before the boot line
    except BaseException:
        proc.kill()
        proc.communicate()
        raise


def _wait_gone(pid: int, what: str) -> None:
    deadline = time.monotonic() + 10
    while process_alive(pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_interrupt_kills_packer_and_its_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during a build: Packer's whole process group (the VM with it) is stopped."""
    body = f"""\
sleep 300 &
echo $! > {tmp_path}/vm.pid
echo "==> qemu.fleetbake: Starting VM, booting disk image"
wait
"""
    proc, vm = _booting_build(tmp_path, monkeypatch, body)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode != 0 and "KeyboardInterrupt" in err
    finally:
        if proc.poll() is None:  # a failure above: do not leak the driver into other tests
            proc.kill()
            proc.communicate()
    _wait_gone(vm, "the VM process outlived the interrupted build")


def test_a_killed_bake_tells_packer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bake itself killed (SIGKILL: the OOM killer, a builder's cancel past its grace):
    Packer, in its own session, still gets SIGTERM, on which it stops its VM."""
    body = f"""\
sleep 300 &
vm=$!
echo $vm > {tmp_path}/vm.pid
trap 'kill $vm; exit 143' TERM
echo "==> qemu.fleetbake: Starting VM, booting disk image"
wait
"""
    proc, vm = _booting_build(tmp_path, monkeypatch, body)
    proc.kill()
    proc.communicate()
    try:
        _wait_gone(vm, "Packer went on (and its VM with it) after the bake was killed")
    finally:
        if process_alive(vm):  # a failure: the fake Packer ends with its VM
            os.kill(vm, signal.SIGKILL)
