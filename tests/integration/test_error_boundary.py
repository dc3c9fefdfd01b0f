"""The error boundary of `imagefactory` and `executor`, against their installed commands: a
failing host tool, an output the OS refuses, and Ctrl-C each end in one `Error: ...` line
(a failed tool's last output lines follow it, indented) and a chosen exit code, with the
traceback only under --debug.

The read-only directory is a read-only tmpfs mounted in a private mount namespace
(`unshare --mount`) that only the command under test sees: root ignores file modes, and
nothing is mounted on the host, so there is nothing to clean up.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from imagefactory.run import CommandError
from imagefactory.targets import TARGETS
from tests.integration.executor_pipelines import make_pipeline, task
from tests.processes import process_alive, signal_when

BIN = Path(sys.executable).parent
IMAGEFACTORY = str(BIN / "imagefactory")
EXECUTOR = str(BIN / "executor")
# Rendering a foreign target never probes KVM; its first command is ssh-keygen.
FOREIGN = next(t.name for t in TARGETS if not t.is_native)
RENDER = ["render", "-t", FOREIGN, "--packer-version", "1.9.0"]
EXIT_HOST, EXIT_INTERRUPTED = 4, 130


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A PATH with tmp_path/bin first (for tool shims), and private cache and state."""
    (tmp_path / "bin").mkdir()
    return dict(
        os.environ,
        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        IMAGEFACTORY_CACHE=str(tmp_path / "cache"),
        EXECUTOR_STATE_DIR=str(tmp_path / "state"),
    )


def shim(env: dict[str, str], name: str, script: str) -> None:
    path = Path(env["PATH"].split(":")[0]) / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def run(argv: Sequence[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


def error_block(result: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr as one `Error:` line plus indented lines; no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("Error:")] == lines[:1], result.stderr
    assert all(line.startswith("  ") for line in lines[1:]), result.stderr
    return lines


# -- a host tool that fails -------------------------------------------------------------


def test_a_failing_tool_is_one_error_line_naming_it_and_the_tail_of_its_output(
    tmp_path: Path, env: dict[str, str]
) -> None:
    noise = "".join(f"echo 'noise {i}' >&2\n" for i in range(1, 6))
    shim(env, "ssh-keygen", noise + "echo 'ssh-keygen: disk on fire' >&2\nexit 3\n")
    result = run([IMAGEFACTORY, *RENDER, "-o", str(tmp_path / "build")], env)
    assert result.returncode == EXIT_HOST, result.stderr
    key = tmp_path / "build" / FOREIGN / "build_key"
    headline, *tail = error_block(result)
    assert headline.startswith("Error: command failed with exit code 3: ssh-keygen -q ")
    assert headline.endswith(f"-f {shlex.quote(str(key))}")
    assert tail == [
        "  noise 2",
        "  noise 3",
        "  noise 4",
        "  noise 5",
        "  ssh-keygen: disk on fire",
    ]
    assert result.stdout == ""


def test_debug_shows_the_traceback_then_the_same_error(tmp_path: Path, env: dict[str, str]) -> None:
    shim(env, "ssh-keygen", "echo 'ssh-keygen: disk on fire' >&2\nexit 3\n")
    result = run([IMAGEFACTORY, "--debug", *RENDER, "-o", str(tmp_path / "build")], env)
    assert result.returncode == EXIT_HOST
    traceback, error = result.stderr.split("\nError: ")
    assert "Traceback (most recent call last)" in traceback
    assert "imagefactory.run.CommandError: command failed with exit code 3" in traceback
    assert "DEBUG imagefactory.run: run: ssh-keygen" in traceback  # and the command log
    assert error.startswith("command failed with exit code 3: ssh-keygen")
    assert error.endswith("\n  ssh-keygen: disk on fire\n")


def test_a_tool_killed_by_a_signal_is_named_so(tmp_path: Path, env: dict[str, str]) -> None:
    shim(env, "ssh-keygen", "kill -KILL $$\n")
    result = run([IMAGEFACTORY, *RENDER, "-o", str(tmp_path / "build")], env)
    assert result.returncode == EXIT_HOST
    assert error_block(result)[0].startswith("Error: command killed by SIGKILL: ssh-keygen ")


def test_the_error_shows_stdout_when_stderr_is_empty_and_clips_long_lines() -> None:
    long = "x" * 500
    exc = CommandError(["qemu-img", "convert", "a b"], 1, f"one\n\n{long}\n", "  \n")
    head, clipped = "command failed with exit code 1: qemu-img convert 'a b'", "x" * 197 + "..."
    assert exc.message() == f"{head}\n  one\n  {clipped}"
    assert str(exc) == f"{head}; one | {clipped}"


# -- Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_in_imagefactory_exits_130_and_stops_the_tool(
    tmp_path: Path, env: dict[str, str]
) -> None:
    pidfile = tmp_path / "tool.pid"
    shim(
        env,
        "ssh-keygen",
        f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}\nexec sleep 300\n",
    )
    argv = [IMAGEFACTORY, *RENDER, "-o", str(tmp_path / "build")]
    code, stderr = signal_when(argv, signal.SIGINT, pidfile, env)
    assert code == EXIT_INTERRUPTED, stderr
    assert stderr.strip() == "Aborted!"
    deadline = time.monotonic() + 10
    while process_alive(int(pidfile.read_text())):
        assert time.monotonic() < deadline, "the interrupted tool outlived imagefactory"
        time.sleep(0.05)


def test_ctrl_c_in_executor_exits_130(tmp_path: Path, env: dict[str, str]) -> None:
    started = tmp_path / "importing"
    source = make_pipeline(tmp_path / "p", [task("a", "add")])
    (source / "tasks.py").write_text(
        f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(300)\n"
    )
    code, stderr = signal_when([EXECUTOR, "validate", str(source)], signal.SIGINT, started, env)
    assert (code, stderr) == (EXIT_INTERRUPTED, "Error: interrupted\n")


# -- outputs the OS refuses -------------------------------------------------------------------


# Mounts a read-only tmpfs on $0 in a new private mount namespace, then runs "$@" there.
READ_ONLY = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
READ_ONLY += ['mount -t tmpfs -o ro,size=1m fleetbake-ro "$0" && exec "$@"']


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[Path, Callable[[list[str]], list[str]]]]:
    """(directory, wrap): `wrap(argv)` runs argv where the directory is a read-only tmpfs."""
    directory = tmp_path / "ro"
    directory.mkdir()

    def wrap(argv: list[str]) -> list[str]:
        return [*READ_ONLY, str(directory), *argv]

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(wrap(["touch", str(directory / "x")]), capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot mount a read-only tmpfs in a mount namespace: {probe.stderr.strip()}")
    yield directory, wrap
    assert not os.path.ismount(directory) and not any(directory.iterdir())


@pytest.mark.parametrize(
    ("argv", "file", "code"),
    [
        ([IMAGEFACTORY, *RENDER, "-o", "{ro}/build"], "{ro}/build", EXIT_HOST),
        # seed and pack stop with their own user error: "cannot write FILE: ..." (exit 2).
        ([IMAGEFACTORY, "seed", "--node-id", "n-1", "-o", "{ro}/seed.iso"], "{ro}/seed.iso", 2),
        ([EXECUTOR, "run", "{p}", "--results", "{ro}/r.json"], "{ro}/r.json:", EXIT_HOST),
        ([EXECUTOR, "run", "{p}", "--log", "{ro}/run.log"], "{ro}/run.log", EXIT_HOST),
        ([EXECUTOR, "pack", "{p}", "-o", "{ro}/p.tar.gz"], "{ro}/p.tar.gz", 2),
    ],
    ids=[
        "imagefactory-render",
        "imagefactory-seed",
        "executor-results",
        "executor-log",
        "executor-pack",
    ],
)
def test_a_read_only_output_is_one_error_line_naming_the_file(
    tmp_path: Path,
    env: dict[str, str],
    read_only: tuple[Path, Callable[[list[str]], list[str]]],
    argv: list[str],
    file: str,
    code: int,
) -> None:
    directory, wrap = read_only
    source = make_pipeline(tmp_path / "p", [task("a", "add")])
    names = {"ro": str(directory), "p": str(source)}
    result = run(wrap([a.format(**names) for a in argv]), env)
    assert result.returncode == code, result.stderr
    [line] = error_block(result)
    assert file.format(**names) in line and line.endswith("Read-only file system")


@pytest.mark.parametrize("tool", ["imagefactory", "executor"])
def test_debug_shows_the_os_errors_traceback(
    tmp_path: Path, env: dict[str, str], tool: str
) -> None:
    """A path below a regular file fails for root too, without any mount."""
    (tmp_path / "file").write_text("")
    if tool == "imagefactory":
        argv = [IMAGEFACTORY, "--debug", *RENDER, "-o", str(tmp_path / "file" / "build")]
    else:
        source = make_pipeline(tmp_path / "p", [task("a", "add")])
        argv = [EXECUTOR, "--debug", "run", str(source), "--log", str(tmp_path / "file" / "l")]
    result = run(argv, env)
    assert result.returncode == EXIT_HOST
    assert "Traceback (most recent call last)" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"Error: {tmp_path / 'file'}")  # ENOTDIR, or EEXIST from mkdir -p
    without = run([a for a in argv if a != "--debug"], env)
    assert (without.returncode, without.stderr.splitlines()) == (EXIT_HOST, [last])
