"""Container hosts without running one: which references and hosts are taken, the pull
and run lines for runc (skopeo), docker and podman, local and over SSH, and the commands
a remote place/remove sends (docker and podman cannot run on this machine: podman fails
in runc's setrlimit here, and there is no docker daemon; their real test is nightly)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from imagefactory.boot import engines, seed
from imagefactory.deploy import container_host
from imagefactory.deploy.container_host import ImageRef, check_host, parse_reference
from imagefactory.errors import UserError
from imagefactory.targets import get_target

HEX = "0123456789abcdef" * 4
DIGEST = f"sha256:{HEX}"


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        (f"http://127.0.0.1:5000/fleetbake/hello@{DIGEST}",
         ImageRef("http://127.0.0.1:5000", "fleetbake/hello", DIGEST)),
        (f"127.0.0.1:5000/fleetbake/hello:b1@{DIGEST}",
         ImageRef("127.0.0.1:5000", "fleetbake/hello", DIGEST)),
        (f"https://registry.example/fleetbake/etl-demo_2@{DIGEST}",
         ImageRef("registry.example", "fleetbake/etl-demo_2", DIGEST)),
    ],
)  # fmt: skip
def test_references_pinned_by_digest(reference: str, expected: ImageRef) -> None:
    assert parse_reference(reference) == expected


@pytest.mark.parametrize(
    "reference",
    [
        "127.0.0.1:5000/fleetbake/hello:b1",  # a tag alone can move
        f"127.0.0.1:5000/fleetbake/hello@sha256:{HEX[:-1]}",
        f"127.0.0.1:5000/FleetBake/hello@{DIGEST}",
        f"--config=/x/fleetbake/hello@{DIGEST}",  # an option, not a host
        f"ftp://h/fleetbake/hello@{DIGEST}",
        f"h/fleetbake/hello@{DIGEST} --privileged",
        f"h/../hello@{DIGEST}",
        "",
    ],
)
def test_other_references_are_refused(reference: str) -> None:
    with pytest.raises(UserError, match="not an image reference pinned by digest"):
        parse_reference(reference)


def test_pinned_and_skopeo_source() -> None:
    plain = parse_reference(f"http://127.0.0.1:5000/fleetbake/hello@{DIGEST}")
    assert plain.pinned == f"127.0.0.1:5000/fleetbake/hello@{DIGEST}"
    assert plain.source() == (f"docker://127.0.0.1:5000/fleetbake/hello@{DIGEST}", False)
    tls = parse_reference(f"registry.example:443/fleetbake/hello@{DIGEST}")
    assert tls.source() == (f"docker://registry.example:443/fleetbake/hello@{DIGEST}", True)


@pytest.mark.parametrize(
    ("host", "runtime", "remote"),
    [
        ("local", "runc", None),
        ("local", "podman", None),
        ("ssh://ops@hv1.example:2222", "docker", "ssh://ops@hv1.example:2222"),
        ("ssh://10.0.0.7", "podman", "ssh://10.0.0.7"),
    ],
)
def test_container_hosts(host: str, runtime: str, remote: str | None) -> None:
    assert check_host(host, runtime) == remote


@pytest.mark.parametrize(
    ("host", "runtime", "words"),
    [
        ("ssh://hv1", "runc", "runc runs containers on this machine only"),
        ("tcp://hv1:2375", "docker", "neither `local` nor ssh://"),
        ("ssh://hv1/x; reboot", "docker", "neither `local` nor ssh://"),
        ("ssh://-oProxyCommand=x", "docker", "neither `local` nor ssh://"),
        ("local", "crun", "unknown container runtime 'crun'"),
    ],
)
def test_other_hosts_are_refused(host: str, runtime: str, words: str) -> None:
    with pytest.raises(UserError, match=words.replace("(", r"\(")):
        check_host(host, runtime)


def test_skopeo_pulls_by_digest_into_a_layout(tmp_path: Path) -> None:
    source = f"docker://r:5000/fleetbake/hello@{DIGEST}"
    assert container_host.skopeo_pull_argv(source, tmp_path / "l", False, None) == [
        "skopeo", "copy", "--quiet", "--preserve-digests", "--src-tls-verify=false",
        source, f"oci:{tmp_path / 'l'}:latest",
    ]  # fmt: skip
    argv = container_host.skopeo_pull_argv(source, tmp_path / "l", True, tmp_path / "certs")
    assert argv[4:7] == ["--src-tls-verify=true", "--src-cert-dir", str(tmp_path / "certs")]


@pytest.mark.parametrize(
    ("engine", "host", "start"),
    [
        ("docker", None, ["docker"]),
        ("podman", None, ["podman"]),
        ("docker", "ssh://ops@h:22", ["docker", "-H", "ssh://ops@h:22"]),
        ("podman", "ssh://ops@h:22", ["podman", "--url", "ssh://ops@h:22/run/podman/podman.sock"]),
    ],
)
def test_engine_commands_local_and_remote(engine: str, host: str | None, start: list[str]) -> None:
    assert engines.command(engine, host) == start


def test_engine_pull_lines(tmp_path: Path) -> None:
    ref = f"r:5000/fleetbake/hello@{DIGEST}"
    assert engines.pull_argv("docker", ref, False, tmp_path) == ["docker", "pull", "--quiet", ref]
    assert engines.pull_argv("podman", ref, True, tmp_path) == [
        "podman", "pull", "--quiet", "--tls-verify=true", "--cert-dir", str(tmp_path), ref,
    ]  # fmt: skip
    remote = engines.pull_argv("podman", ref, False, tmp_path, "ssh://h")
    assert remote == [*engines.command("podman", "ssh://h"), "pull", "--quiet",
                      "--tls-verify=false", ref]  # fmt: skip


def test_a_remote_run_line_has_a_network_and_a_tmpfs_state(tmp_path: Path) -> None:
    argv = engines.run_argv(
        "docker", "fleetbake-n", "img@x", "n", tmp_path / "env", None, "ssh://h", (1000, 1000)
    )
    assert argv[:4] == ["docker", "-H", "ssh://h", "run"] and argv[-1] == "img@x"
    pairs = dict(zip(argv, argv[1:], strict=False))
    assert "--network" not in argv and "--volume" not in argv
    assert "/var/lib/executor:mode=0700,uid=1000,gid=1000" in argv
    assert pairs["--cap-drop"] == "ALL" and "--read-only" in argv


class Recorder:
    """`run` as the engines would answer it: records argv (and the env file's text)."""

    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.env_text = ""
        self.fail = fail

    def __call__(self, argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append([str(a) for a in argv])
        out = ""
        if "run" in argv:
            env_file = Path(argv[argv.index("--env-file") + 1])
            self.env_text = env_file.read_text()
        if "{{.Config.User}}" in argv:
            out = "1000:1000\n"
        if self.fail and self.fail in argv:
            from imagefactory.run import CommandError

            raise CommandError(argv, 1, "", "noise\nError: manifest unknown\n")
        return subprocess.CompletedProcess(argv, 0, out, "")


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    rec = Recorder()
    monkeypatch.setattr(container_host, "run", rec)
    monkeypatch.setattr(engines, "run", rec)
    monkeypatch.setattr(container_host, "require_runtime", lambda runtime: runtime)
    return rec


def node() -> seed.NodeVars:
    return seed.NodeVars(node_id="edge-1-3f9c2a", run_id="r1", token="t0k", on_complete="none")


def test_a_remote_docker_host_pulls_by_digest_and_runs(recorder: Recorder) -> None:
    lines: list[str] = []
    details = container_host.place_container(
        "ssh://ops@h", "docker", f"http://r:5000/fleetbake/hello:b1@{DIGEST}",
        get_target("aarch64-linux"), node(), "https://master.example:8750", lines.append,
    )  # fmt: skip
    pinned = f"r:5000/fleetbake/hello@{DIGEST}"
    assert details == {
        "host": "ssh://ops@h", "runtime": "docker", "reference": pinned,
        "container": "fleetbake-edge-1-3f9c2a", "node_id": "edge-1-3f9c2a",
    }  # fmt: skip
    remote = ["docker", "-H", "ssh://ops@h"]
    verbs = [c[3] for c in recorder.calls]
    assert all(c[:3] == remote for c in recorder.calls)
    assert verbs == ["pull", "image", "stop", "rm", "run", "inspect"]
    assert recorder.calls[0][-1] == pinned and recorder.calls[4][-1] == pinned
    assert "EXECUTOR_MASTER_URL=https://master.example:8750\n" in recorder.env_text
    assert "EXECUTOR_TOKEN=t0k\n" in recorder.env_text
    env_file = recorder.calls[4][recorder.calls[4].index("--env-file") + 1]
    assert not Path(env_file).exists(), "the token file is gone once the container runs"
    assert lines[-1] == "node edge-1-3f9c2a: started on ssh://ops@h (docker container " \
        "fleetbake-edge-1-3f9c2a)"  # fmt: skip

    recorder.calls.clear()
    container_host.remove_container(details, lines.append)
    assert [c[3] for c in recorder.calls] == ["stop", "rm"]
    assert recorder.calls[0][-3:] == ["--time", "30", "fleetbake-edge-1-3f9c2a"]


def test_a_failed_pull_is_one_line(recorder: Recorder) -> None:
    recorder.fail = "pull"
    with pytest.raises(UserError) as raised:
        container_host.place_container(
            "ssh://h", "podman", f"r:5000/fleetbake/hello@{DIGEST}",
            get_target("x86_64-linux"), node(), None, print,
        )  # fmt: skip
    assert raised.value.format_message() == (
        f"cannot pull r:5000/fleetbake/hello@{DIGEST}: Error: manifest unknown"
    )
    assert [c[3] for c in recorder.calls] == ["pull"]


def test_undeploy_refuses_a_hostile_record(recorder: Recorder) -> None:
    details = {"host": "local", "runtime": "runc", "container": "x", "node_id": "../../etc"}
    with pytest.raises(UserError, match="invalid node ID"):
        container_host.remove_container(details, print)
    assert recorder.calls == []


def test_last_line() -> None:
    assert container_host.last_line("a\n\n  b  \n\n") == "b"
    assert container_host.last_line("") == "(no output)"
