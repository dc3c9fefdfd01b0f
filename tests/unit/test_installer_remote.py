"""`imagefactory install` without a device: destinations, host-key policy, the per-device
steps against a fake SSH edge (connect/upload/run replaced by recorders), and the CLI's
refusals, which must come before any device is touched."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import paramiko
import pytest

from imagefactory.install import fleet as fleet_module
from imagefactory.install.destination import Destination, parse_destination
from imagefactory.install.fleet import Fleet, Job, summary_lines
from imagefactory.install.hostkeys import (
    HostKeyPolicy,
    HostKeyRefused,
    _Unknown,
    check_fingerprint,
    fingerprint,
)
from imagefactory.install.remote import RemoteError
from tests.installer_bake import bake_installer
from tests.ports import closed_port

IMAGEFACTORY = str(Path(sys.executable).with_name("imagefactory"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("root@10.0.0.7", Destination("root", "10.0.0.7", 22)),
        ("ops@edge-1.lab:2222", Destination("ops", "edge-1.lab", 2222)),
        ("ops@[fd00::7]:22", Destination("ops", "fd00::7", 22)),
        ("ops@[fd00::7]", Destination("ops", "fd00::7", 22)),
    ],
)
def test_destinations(text: str, expected: Destination) -> None:
    assert parse_destination(text) == expected


@pytest.mark.parametrize(
    "text",
    ["10.0.0.7", "@host", "root@", "root@host:0", "root@host:70000", "a b@h", "r@-h", "r@h;x"],
)
def test_bad_destinations(text: str) -> None:
    with pytest.raises(click.ClickException, match="is not USER@HOST"):
        parse_destination(text)


def test_known_hosts_names() -> None:
    assert Destination("r", "h").known_hosts_name == "h"
    assert Destination("r", "h", 2222).known_hosts_name == "[h]:2222"
    assert str(Destination("r", "fd00::7", 2222)) == "r@[fd00::7]:2222"


def _key() -> paramiko.PKey:
    return paramiko.ECDSAKey.generate(bits=256)


def test_fingerprint_is_openssh_sha256(tmp_path: Path) -> None:
    key = _key()
    pub = tmp_path / "k.pub"
    pub.write_text(f"{key.get_name()} {key.get_base64()}\n")
    listed = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True)
    assert listed.stdout.split()[1] == fingerprint(key)
    assert check_fingerprint(fingerprint(key)) == fingerprint(key)


@pytest.mark.parametrize("text", ["", "SHA256:", "MD5:aa:bb", "SHA256:" + "A" * 42, "SHA256:!!"])
def test_bad_fingerprints(text: str) -> None:
    with pytest.raises(ValueError, match="is not a fingerprint"):
        check_fingerprint(text)


def test_unknown_key_is_refused_and_names_its_fingerprint(tmp_path: Path) -> None:
    key = _key()
    policy = HostKeyPolicy(tmp_path / "known_hosts")
    with pytest.raises(HostKeyRefused, match=f"its key is .* {re.escape(fingerprint(key))}"):
        _Unknown(policy).missing_host_key(paramiko.SSHClient(), "[h]:2222", key)
    assert not policy.known_hosts.exists()


def test_given_fingerprint_is_trusted_and_others_are_not(tmp_path: Path) -> None:
    key, other = _key(), _key()
    policy = HostKeyPolicy(tmp_path / "kh", frozenset({fingerprint(key)}), accept_new=True)
    _Unknown(policy).missing_host_key(paramiko.SSHClient(), "h", key)
    with pytest.raises(HostKeyRefused, match="not the one given"):
        _Unknown(policy).missing_host_key(paramiko.SSHClient(), "h", other)
    assert not policy.known_hosts.exists(), "a given fingerprint is not written anywhere"


def test_accept_new_records_the_key_and_then_trusts_only_it(tmp_path: Path) -> None:
    key = _key()
    policy = HostKeyPolicy(tmp_path / "ssh" / "known_hosts", accept_new=True)
    _Unknown(policy).missing_host_key(paramiko.SSHClient(), "[h]:2222", key)
    assert policy.known_hosts.stat().st_mode & 0o777 == 0o600
    keys = paramiko.HostKeys(str(policy.known_hosts))
    assert keys.check("[h]:2222", key)
    assert not keys.check("[h]:2222", _key())


class FakeEdge:
    """Stands in for remote.connect/run_quiet/upload/run_streaming and records calls."""

    def __init__(self, script_output: dict[str, tuple[int, list[str]]]) -> None:
        self.output = script_output
        self.commands: list[tuple[str, str]] = []
        self.uploads: dict[str, dict[str, tuple[bytes, int]]] = {}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(fleet_module, "connect", self.connect)
        monkeypatch.setattr(fleet_module, "run_quiet", self.run_quiet)
        monkeypatch.setattr(fleet_module, "upload", self.upload)
        monkeypatch.setattr(fleet_module, "run_streaming", self.run_streaming)

    def connect(self, dest: Destination, policy: Any, identity: Any) -> Any:
        if dest.host == "down":
            raise RemoteError(f"cannot connect to {dest}: [Errno 111] Connection refused")
        return _Client(dest.host)

    def run_quiet(self, client: Any, command: str, timeout: float = 60) -> str:
        self.commands.append((client.host, command))
        return "/tmp/fleetbake-install.abcd1234\n" if command.startswith("mktemp") else ""

    def upload(self, client: Any, files: dict[str, tuple[bytes, int]]) -> None:
        self.uploads[client.host] = files

    def run_streaming(self, client: Any, command: str, on_line: Any) -> int:
        self.commands.append((client.host, command))
        status, lines = self.output[client.host]
        for line in lines:
            on_line(line)
        return status


class _Client:
    def __init__(self, host: str) -> None:
        self.host = host

    def close(self) -> None:
        pass


def test_devices_run_independently_and_failures_say_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    edge = FakeEdge(
        {
            "a": (0, ["install.sh: installing fleetbake-node 1", "install.sh: started"]),
            "b": (0, ["install.sh: nothing to change: fleetbake-node 1 is installed"]),
            "c": (3, ["install.sh: error: systemd is not running here; ..."]),
        }
    )
    edge.install(monkeypatch)
    script = tmp_path / "install.sh"
    script.write_bytes(b"#!/bin/sh\n")
    lines: list[str] = []
    jobs = [
        Job(Destination("root", "a"), "n-1", ("--node-id", "n-1"), token="tok-1"),
        Job(Destination("ops", "b"), "n-2", ("--node-id", "n-2"), token="tok-2"),
        Job(Destination("root", "c"), "n-3", ("--node-id", "n-3"), token="tok-3"),
        Job(Destination("root", "down"), "n-4", ("--node-id", "n-4"), token="tok-4"),
    ]
    outcomes = Fleet(script, HostKeyPolicy(tmp_path / "kh"), None, lines.append).run(jobs)
    assert [o.status for o in outcomes] == ["installed", "unchanged", "failed", "failed"]
    assert (
        outcomes[2].error
        == "install.sh exited with 3: install.sh: error: systemd is not running here; ..."
    )
    assert "Connection refused" in (outcomes[3].error or "")
    # The token travels as a 0600 file, never on a command line; ops goes through sudo.
    assert not [c for _, c in edge.commands if "tok-" in c]
    run_b = [c for h, c in edge.commands if h == "b" and "install.sh" in c]
    assert run_b[0].startswith("sudo -n sh /tmp/fleetbake-install.abcd1234/install.sh ")
    assert "--token-file /tmp/fleetbake-install.abcd1234/token" in run_b[0]
    files = edge.uploads["a"]
    assert files["/tmp/fleetbake-install.abcd1234/token"] == (b"tok-1\n", 0o600)
    assert files["/tmp/fleetbake-install.abcd1234/install.sh"] == (b"#!/bin/sh\n", 0o700)
    # The upload is removed on every device that got one, the failed one too.
    removed = {h for h, c in edge.commands if c.startswith("rm -rf /tmp/fleetbake-install.")}
    assert removed == {"a", "b", "c"}
    assert "[root@a] install.sh: started" in lines
    summary = summary_lines(outcomes)
    (line_c,) = [line for line in summary if "root@c" in line]
    assert re.search(r"root@c +node n-3: failed \(\d+ s\): install.sh exited with 3", line_c)


def test_a_failing_wait_fails_only_its_device(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    FakeEdge({"a": (0, ["ok"]), "b": (0, ["ok"])}).install(monkeypatch)
    script = tmp_path / "install.sh"
    script.write_bytes(b"x")

    def after(session: fleet_module.Session) -> str | None:
        if session.outcome.dest.host == "b":
            raise RemoteError("timed out after 5 s waiting for 'heartbeat' on n-2")
        return "heartbeat"

    jobs = [Job(Destination("root", h), f"n-{i}", ()) for i, h in enumerate("ab", 1)]
    outcomes = Fleet(script, HostKeyPolicy(tmp_path / "kh"), None, lambda _: None, after).run(jobs)
    assert [(o.status, o.wait) for o in outcomes] == [("installed", "heartbeat"), ("failed", None)]


@pytest.fixture(scope="module")
def installer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bake_installer(tmp_path_factory.mktemp("installer"))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [IMAGEFACTORY, "install", *args], capture_output=True, text=True, timeout=120
    )


IDENT = ["--node-id", "n", "--master", "http://10.0.0.5:8750", "--token", "t"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--ssh", "root@h"], "--node-id and --master are required"),
        (["--ssh", "nohost", *IDENT], "is not USER@HOST"),
        (["--ssh", "root@a", "--ssh", "root@b", *IDENT], "a --token belongs to one node"),
        (["--ssh", "root@a", "--ssh", "root@a", *IDENT], "the same --ssh device is given twice"),
        (["--ssh", "root@a", *IDENT, "--env", "EXECUTOR_TOKEN=x"], "--env cannot set"),
        (["--ssh", "root@a", *IDENT, "--env", "A"], "is not of the form KEY=VALUE"),
        (["--ssh", "root@a", *IDENT[:4]], "give one of --token or --secret-file"),
        (["--ssh", "root@a", *IDENT, "--host-key-fingerprint", "MD5:x"], "is not a fingerprint"),
        (["--ssh", "root@a", "--purge"], "--purge goes with --uninstall"),
        (["--ssh", "root@a", "--node-id", "b/d", *IDENT[2:]], "invalid node ID"),
        (["--ssh", "root@a", *IDENT[:2], "--master", "ftp://x", *IDENT[4:]], "invalid master URL"),
    ],
)
def test_usage_errors_touch_no_device(installer: Path, args: list[str], words: str) -> None:
    result = cli(str(installer), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("Error: ") and words in result.stderr
    assert "Traceback" not in result.stderr
    assert "connecting" not in result.stderr


def test_a_damaged_installer_is_never_sent(installer: Path, tmp_path: Path) -> None:
    copy = tmp_path / "x86_64-linux-installer"
    copy.mkdir()
    shutil.copytree(installer, copy, dirs_exist_ok=True)
    with (copy / "install.sh").open("ab") as script:
        script.write(b"\n# tampered\n")
    result = cli(str(copy), "--ssh", "root@127.0.0.1:1", *IDENT)
    assert result.returncode == 2
    assert "does not match" in result.stderr


def test_unreachable_device_fails_with_a_summary(installer: Path) -> None:
    port = closed_port()
    result = cli(str(installer), "--ssh", f"root@127.0.0.1:{port}", *IDENT, "--json")
    assert result.returncode == 1, result.stderr
    (outcome,) = json.loads(result.stdout)
    assert outcome["status"] == "failed"
    assert outcome["error"] == f"cannot connect to root@127.0.0.1:{port}: Connection refused"
    assert f"Error: failed on 1 of 1 device(s): root@127.0.0.1:{port}" in result.stderr


def _jobs(**changes: Any) -> list[Job]:
    from imagefactory.cli.install import NodeInputs, node_jobs

    base = NodeInputs("edge", "http://10.0.0.5:8750", None, "t", None, (), "none", None, False)
    return node_jobs([Destination("root", "a")], dataclasses.replace(base, **changes))


def test_install_sh_gets_the_seed_s_variables_but_never_the_token() -> None:
    (job,) = _jobs(insecure=True, run_id="r-1", env_pairs=("PROBE=a b",))
    assert job.args == (
        "--node-id", "edge", "--run-id", "r-1", "--master", "http://10.0.0.5:8750",
        "--env", "EXECUTOR_INSECURE=1", "--on-complete", "none", "--env", "PROBE=a b",
    )  # fmt: skip
    assert job.token == "t" and "t" not in job.args


def test_master_ca_needs_https_and_a_certificate(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate\n")
    with pytest.raises(click.ClickException, match="--master-ca"):
        _jobs(master_ca_file=bad)
    with pytest.raises(click.ClickException, match="cannot read --master-ca"):
        _jobs(master_ca_file=tmp_path / "missing.crt")


def test_several_devices_get_numbered_ids_and_their_own_tokens(tmp_path: Path) -> None:
    from imagefactory.cli.install import NodeInputs, node_jobs
    from imagefactory.tokens import node_token

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    given = NodeInputs("edge", "http://10.0.0.5:8750", secret, None, "run", (), "none", None, False)
    jobs = node_jobs([Destination("root", "a"), Destination("root", "b")], given)
    assert [j.node_id for j in jobs] == ["edge-1", "edge-2"]
    assert [j.token for j in jobs] == [
        node_token("s3cret", "edge-1"),
        node_token("s3cret", "edge-2"),
    ]
    assert ("--run-id", "run-2") == jobs[1].args[2:4]


def _unchecked_installer(tmp_path: Path) -> Path:
    """install.sh and its SHA256SUMS: all `find_script` checks (no device ever gets it)."""
    script = tmp_path / "install.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    digest = subprocess.run(["sha256sum", "install.sh"], cwd=tmp_path, capture_output=True)
    (tmp_path / "SHA256SUMS").write_bytes(digest.stdout)
    return tmp_path


@pytest.mark.parametrize("insecure", [False, True])
def test_insecure_reaches_the_admin_api_of_wait(tmp_path: Path, insecure: bool) -> None:
    """--insecure lets --wait's admin client use the plain http:// master the devices use;
    without it the refusal comes before any device is touched. The only connection made
    is to a closed loopback port (the device)."""
    token_file = tmp_path / "admin.token"
    token_file.write_text("admin\n")
    port = closed_port()
    args = [str(_unchecked_installer(tmp_path)), "--ssh", f"root@127.0.0.1:{port}", *IDENT]
    args += ["--admin-token-file", str(token_file), "--wait", "report"]
    result = cli(*args, *(["--insecure"] if insecure else []))
    assert "Traceback" not in result.stderr
    if not insecure:
        assert result.returncode == 2
        assert result.stderr.startswith("Error: refusing plain http:// to 10.0.0.5")
        assert "connect" not in result.stderr
        return
    assert result.returncode == 1, result.stderr
    assert "refusing plain http://" not in result.stderr
    assert f"cannot connect to root@127.0.0.1:{port}: Connection refused" in result.stderr


def test_waiter_admin_client_takes_insecure(tmp_path: Path) -> None:
    from imagefactory.cli.install import waiter

    token_file = tmp_path / "admin.token"
    token_file.write_text("admin\n")
    url = "http://10.0.0.5:8750"
    with pytest.raises(click.ClickException, match="refusing plain http://"):
        waiter("report", 5, url, token_file, tmp_path)
    assert callable(waiter("report", 5, url, token_file, tmp_path, insecure=True))
