"""install.sh on this host: its node.env, its usage errors and its refusals.

The refusals run the real script against a system changed only for it: each case runs in
a private mount namespace (`unshare --mount`) where a file or directory is mounted over
the real one. That is how a test stands in for systems this host is not:

- not Debian-family: a Fedora /etc/os-release mounted over this one;
- systemd running: an empty /run with /run/systemd/system in it (this container has no
  systemd; it is the directory systemd itself checks);
- Python too old: FAKED, as no such Debian is at hand: a shim that answers like Python
  3.10.12 mounted over /usr/bin/python3 (the interpreter the package's launcher uses);
- another architecture: an installer baked for the other target (a real one);
- not root: the script run as `nobody` (setpriv).

Nothing reaches the host's real /etc or dpkg database: every case stops at its refusal
before the first change, which the damaged-package case checks too.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefactory.boot import nodeenv, seed
from imagefactory.targets import host_arch
from tests.installer_bake import ETL, bake_installer

HOSTILE = "sp ace \"dq\" 'sq' a=b $HOME ${X} `id` back\\slash \\\\ ü✓ #h"
IDENTITY = ["--node-id", "edge-1", "--master", "http://10.0.0.5:8750", "--token", "t0k"]
OTHER_TARGET = {"x86_64": "aarch64-linux", "aarch64": "x86_64-linux"}

needs_root_tools = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None,
    reason="mount namespaces need root and util-linux's unshare and setpriv",
)


@pytest.fixture(scope="module")
def installers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """install.sh for this host's architecture ("native") and for the other ("foreign")."""
    native = bake_installer(tmp_path_factory.mktemp("native"), f"{host_arch()}-linux")
    foreign = bake_installer(tmp_path_factory.mktemp("foreign"), OTHER_TARGET[host_arch()])
    yield {"native": native / "install.sh", "foreign": foreign / "install.sh"}


def run_script(
    script: Path, *args: str, env: dict[str, str] | None = None, prefix: str = ""
) -> subprocess.CompletedProcess[str]:
    """`sh install.sh ARGS`, after the shell commands in `prefix`, in a mount namespace
    of its own when there is a prefix."""
    command = f"{prefix}\nexec sh {shlex.quote(str(script))} {shlex.join(args)}"
    argv = ["sh", "-c", command]
    if prefix:
        argv = ["unshare", "--mount", "--propagation", "private", *argv]
    base = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return subprocess.run(
        argv, env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def refusal(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    """Exit `code`, nothing on stdout, one `install.sh: error:` line holding `words`."""
    assert result.returncode == code, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("install.sh: error: ")
    assert words in lines[0]


# A systemd-managed system, as far as the script can tell (see the module docstring).
WITH_SYSTEMD = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system"


def test_node_env_is_what_the_seed_writes(installers: dict[str, Path], tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(HOSTILE + "\n")
    result = run_script(
        installers["native"],
        "--print-env",
        "--node-id", "edge-1", "--run-id", "run-7", "--master", "https://m.example:8750/",
        "--token-file", str(token_file), "--env", f"PROBE={HOSTILE}", "--env", "EMPTY=",
        env={"EXECUTOR_WORKERS": "3", "EXECUTOR_HEARTBEAT_S": "2"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    node = seed.NodeVars(
        node_id="edge-1",
        run_id="run-7",
        master_url="https://m.example:8750/",
        token=HOSTILE,
        on_complete="none",
        extra_env=(("EXECUTOR_WORKERS", "3"), ("EXECUTOR_HEARTBEAT_S", "2")),
    )
    expected = nodeenv.render([*node.env(), ("PROBE", HOSTILE), ("EMPTY", "")])
    assert result.stdout == expected


def test_identity_comes_from_the_environment_and_options_win(installers: dict[str, Path]) -> None:
    env = {
        "EXECUTOR_NODE_ID": "from-env",
        "EXECUTOR_MASTER_URL": "http://10.0.0.5:8750",
        "EXECUTOR_TOKEN": "env-token",
        "EXECUTOR_ON_COMPLETE": "poweroff",
    }
    from_env = run_script(installers["native"], "--print-env", env=env)
    assert from_env.returncode == 0, from_env.stderr
    assert 'EXECUTOR_NODE_ID="from-env"\n' in from_env.stdout
    assert 'EXECUTOR_ON_COMPLETE="poweroff"\n' in from_env.stdout
    overridden = run_script(installers["native"], "--print-env", "--node-id", "opt", env=env)
    assert 'EXECUTOR_NODE_ID="opt"\n' in overridden.stdout


@pytest.mark.parametrize(
    ("drop", "words"),
    [
        ("--node-id", "no node id: give --node-id or EXECUTOR_NODE_ID"),
        ("--master", "no master URL"),
        ("--token", "no token"),
    ],
)
def test_missing_identity_is_refused(installers: dict[str, Path], drop: str, words: str) -> None:
    i = IDENTITY.index(drop)
    args = IDENTITY[:i] + IDENTITY[i + 2 :]
    refusal(run_script(installers["native"], *args), 2, words)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--node-id", "bad id"], "invalid node id 'bad id'"),
        (["--node-id", "-x"], "invalid node id '-x'"),
        (["--master", "ftp://x"], "invalid master URL 'ftp://x'"),
        (["--run-id", "a/b"], "invalid run id 'a/b'"),
        (["--on-complete", "reboot"], "invalid on-complete action 'reboot'"),
        (["--env", "NOEQUALS"], "is not of the form KEY=VALUE"),
        (["--env", "1X=y"], "invalid variable name '1X'"),
        (["--env", "EXECUTOR_TOKEN=y"], "--env cannot set EXECUTOR_TOKEN"),
        (["--env", "A=two\nlines"], "the value of A contains a line break"),
        (["--token", "cr\rin"], "the value of EXECUTOR_TOKEN contains a line break"),
        (["--token-file", "/nonexistent"], "cannot read the token file"),
        (["--bogus"], "unknown argument '--bogus'"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--node-id"], "--node-id needs a value"),
    ],
)
def test_bad_input_is_a_usage_error(
    installers: dict[str, Path], args: list[str], words: str
) -> None:
    given = [*IDENTITY, *args]
    if args[0] == "--token-file":  # the file is read only when no token is given
        given = [*IDENTITY[:4], *args]
    refusal(run_script(installers["native"], "--print-env", *given), 2, words)


@needs_root_tools
def test_not_root_is_refused(installers: dict[str, Path]) -> None:
    # The script comes on stdin (`curl ... | sh -s -- ARGS` works the same way): nobody
    # cannot open files in pytest's private temporary directory.
    with installers["native"].open("rb") as script:
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "sh", "-s", "--", *IDENTITY],
            stdin=script, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    refusal(result, 3, "run me as root")


@needs_root_tools
def test_not_debian_is_refused(installers: dict[str, Path], tmp_path: Path) -> None:
    fake = tmp_path / "os-release"
    fake.write_text('ID=fedora\nID_LIKE="rhel centos"\nNAME="Fedora Linux"\n')
    prefix = f"mount --bind {shlex.quote(str(fake))} /etc/os-release"
    result = run_script(installers["native"], *IDENTITY, prefix=prefix)
    refusal(result, 3, "this system is not Debian or Ubuntu (os-release: 'fedora rhel centos')")


@needs_root_tools
def test_no_systemd_is_refused(installers: dict[str, Path]) -> None:
    prefix = "mount -t tmpfs tmpfs /run"  # no /run/systemd/system: systemd is not init
    result = run_script(installers["native"], *IDENTITY, prefix=prefix)
    refusal(result, 3, "systemd is not running here")


@needs_root_tools
def test_another_architecture_is_refused(installers: dict[str, Path]) -> None:
    result = run_script(installers["foreign"], *IDENTITY, prefix=WITH_SYSTEMD)
    native_debarch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    other = OTHER_TARGET[host_arch()]
    refusal(result, 3, f"this installer is for {other} (")
    assert f"but this system is {native_debarch}" in result.stderr


@needs_root_tools
def test_old_python_is_refused(installers: dict[str, Path], tmp_path: Path) -> None:
    # FAKED: no Debian with Python < 3.11 is at hand; this shim answers like 3.10.12.
    shim = tmp_path / "python3"
    shim.write_text('#!/bin/sh\ncase "$*" in *platform*) echo 3.10.12 ;; *) exit 1 ;; esac\n')
    shim.chmod(0o755)
    prefix = f"{WITH_SYSTEMD} && mount --bind {shlex.quote(str(shim))} /usr/bin/python3"
    result = run_script(installers["native"], *IDENTITY, prefix=prefix)
    refusal(result, 3, "Python 3.10.12 at /usr/bin/python3 is older than 3.11")


@needs_root_tools
def test_python_newer_than_the_wheels_is_refused(tmp_path: Path) -> None:
    """examples/numeric's installer carries numpy built for CPython 3.11 (cp311)."""
    numeric = bake_installer(tmp_path / "out", f"{host_arch()}-linux", ETL.parent / "numeric")
    # FAKED: no Debian with Python 3.12 is at hand; this shim answers like 3.12.3.
    shim = tmp_path / "python3"
    shim.write_text(
        '#!/bin/sh\ncase "$*" in *platform*) echo 3.12.3 ;; *">="*) exit 1 ;; *) exit 0 ;; esac\n'
    )
    shim.chmod(0o755)
    prefix = f"{WITH_SYSTEMD} && mount --bind {shlex.quote(str(shim))} /usr/bin/python3"
    result = run_script(numeric / "install.sh", *IDENTITY, prefix=prefix)
    refusal(result, 3, "Python 3.12.3 at /usr/bin/python3 is too new")


@needs_root_tools
def test_damaged_package_is_refused_before_any_change(
    installers: dict[str, Path], tmp_path: Path
) -> None:
    text = installers["native"].read_text()
    start = text.index("base64 -d <<'FLEETBAKE_PAYLOAD_END'\n") + 60
    flipped = "A" if text[start] != "A" else "B"
    damaged = tmp_path / "install.sh"
    damaged.write_text(text[:start] + flipped + text[start + 1 :])
    # /etc/executor on a private tmpfs: were node.env written, it would show there.
    etc = "/etc/executor"
    prefix = f"{WITH_SYSTEMD} && mkdir -p {etc} && mount -t tmpfs tmpfs {etc}"
    probe = f"{prefix} && sh {damaged} {shlex.join(IDENTITY)}; echo rc=$?; ls -A {etc}"
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", probe],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "the embedded package is damaged" in result.stderr
    assert result.stdout.strip() == "rc=1", result.stdout  # and /etc/executor stays empty


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.9, 0.999])
def test_a_truncated_script_runs_nothing(
    installers: dict[str, Path], tmp_path: Path, keep: float
) -> None:
    text = installers["native"].read_bytes()
    cut = tmp_path / "install.sh"
    cut.write_bytes(text[: int(len(text) * keep)])
    for shell in ("sh", "bash"):
        result = subprocess.run(
            [shell, str(cut), "--print-env", *IDENTITY], capture_output=True, text=True
        )
        assert result.stdout == "", f"{shell} ran part of a truncated script"
        assert "EXECUTOR_NODE_ID" not in result.stderr


def test_uninstall_needs_root_and_dpkg_only(installers: dict[str, Path]) -> None:
    """--uninstall needs no identity: here (no package installed) it is a no-op."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if subprocess.run(["dpkg-query", "-W", "fleetbake-node"], capture_output=True).returncode == 0:
        pytest.skip("fleetbake-node is installed on this host")
    result = run_script(installers["native"], "--uninstall")
    assert result.returncode == 0, result.stderr
    assert "fleetbake-node is not installed; nothing to remove" in result.stderr
