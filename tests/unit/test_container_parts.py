"""Container nodes before anything starts: the runtime spec each node gets, the master
URL inside the container, image names, host checks and bad input on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagefactory.bake import oci
from imagefactory.boot import container, runc
from imagefactory.cli.main import main
from imagefactory.errors import UserError
from imagefactory.host import doctor
from imagefactory.targets import get_target

# What umoci writes for an image (trimmed to what runtime_spec touches).
UMOCI_CONFIG = {
    "ociVersion": "1.0.0",
    "process": {
        "terminal": True,
        "user": {"uid": 999, "gid": 996},
        "args": ["/usr/bin/tini", "--", "/usr/local/bin/executor", "agent"],
        "env": ["PATH=/usr/bin:/bin", "EXECUTOR_PIPELINE=/opt/executor/pipeline.tar.gz"],
        "cwd": "/var/lib/executor",
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"]},
    },
    "root": {"path": "rootfs"},
    "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/tmp", "type": "bind", "source": "/tmp", "options": ["rbind"]},
    ],
    "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "mount"}]},
}


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("IMAGEFACTORY_CACHE", str(tmp_path / "cache"))


def spec_of(tmp_path: Path) -> dict[str, object]:
    c = runc.ContainerSpec(
        name="fleetbake-n1",
        rootfs=tmp_path / "rootfs",
        hostname="n1",
        env=(("EXECUTOR_NODE_ID", "n1"), ("EXECUTOR_PIPELINE", "gateway:etl")),
        state_dir=tmp_path / "state",
        netns=Path("/run/netns/fleetbake-n1"),
    )
    return runc.runtime_spec(UMOCI_CONFIG, c)


def test_runtime_spec_isolates_the_node(tmp_path: Path) -> None:
    spec = spec_of(tmp_path)
    assert spec["root"] == {"path": str(tmp_path / "rootfs"), "readonly": True}
    assert spec["hostname"] == "n1"
    process = spec["process"]
    assert isinstance(process, dict)
    assert process["terminal"] is False and process["noNewPrivileges"] is True
    assert all(v == [] for v in process["capabilities"].values())
    assert set(process["capabilities"]) == set(runc.CAPABILITY_SETS)
    # The node's variables win over the image's; the image's others stay.
    assert process["env"] == [
        "PATH=/usr/bin:/bin", "EXECUTOR_PIPELINE=gateway:etl", "EXECUTOR_NODE_ID=n1",
    ]  # fmt: skip
    assert process["user"] == {"uid": 999, "gid": 996}
    linux = spec["linux"]
    assert isinstance(linux, dict)
    networks = [n for n in linux["namespaces"] if n["type"] == "network"]
    assert networks == [{"type": "network", "path": "/run/netns/fleetbake-n1"}]
    mounts = {m["destination"]: m for m in spec["mounts"]}  # type: ignore[attr-defined]
    assert mounts["/tmp"]["type"] == "tmpfs"  # never the host's /tmp
    assert mounts["/var/lib/executor"]["source"] == str(tmp_path / "state")
    assert "/proc" in mounts
    # The base is not changed.
    assert UMOCI_CONFIG["root"] == {"path": "rootfs"}


def test_bundle_config_is_private(tmp_path: Path) -> None:
    image = tmp_path / "image"
    image.mkdir()
    (image / "config.json").write_text(json.dumps(UMOCI_CONFIG))
    c = runc.ContainerSpec("x", tmp_path, "x", (("EXECUTOR_TOKEN", "s3cret"),), tmp_path, tmp_path)
    runc.write_bundle(tmp_path / "bundle", image, c)
    path = tmp_path / "bundle" / "config.json"
    assert path.stat().st_mode & 0o777 == 0o600  # it holds the token
    assert "EXECUTOR_TOKEN=s3cret" in json.loads(path.read_text())["process"]["env"]
    assert runc.image_user(image) == (999, 996)


@pytest.mark.parametrize(
    ("url", "inside"),
    [
        ("http://127.0.0.1:8750", "http://127.0.0.1:8750"),
        ("http://localhost:9000/base", "http://127.0.0.1:9000/base"),
        ("https://127.0.0.1", "https://127.0.0.1:443"),
    ],
)
def test_master_is_the_same_port_inside(url: str, inside: str) -> None:
    assert container.master_inside(url)[2] == inside


@pytest.mark.parametrize("url", ["http://10.0.0.5:8750", "ftp://127.0.0.1", "http://:80"])
def test_master_must_be_on_loopback(url: str) -> None:
    with pytest.raises(UserError):
        container.master_inside(url)


def test_manifest_digest_of_a_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not an OCI image layout"):
        runc.manifest_digest(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"manifests": [{"digest": "sha256:ab"}]}))
    with pytest.raises(UserError, match="names no image"):
        runc.manifest_digest(tmp_path)
    ref = {"org.opencontainers.image.ref.name": "latest"}
    index = {"manifests": [{"digest": "sha256:cd", "annotations": ref}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert runc.manifest_digest(tmp_path) == "sha256:cd"


@pytest.mark.parametrize(
    ("pipeline", "name"),
    [
        ("etl", "fleetbake/etl:x86_64-linux"),
        ("My Pipeline_2", "fleetbake/my-pipeline-2:x86_64-linux"),
        ("___", "fleetbake/pipeline:x86_64-linux"),
    ],
)
def test_image_name_is_a_valid_reference(pipeline: str, name: str) -> None:
    assert oci.image_name(pipeline, get_target("x86_64-linux")) == name


def test_platforms() -> None:
    assert oci.platform_of(get_target("x86_64-linux")).doc() == {
        "architecture": "amd64",
        "os": "linux",
    }
    assert oci.platform_of(get_target("aarch64-linux")).doc()["variant"] == "v8"


def test_require_oci_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "which", lambda p: None if p == "skopeo" else Path("/bin/x"))
    with pytest.raises(UserError) as info:
        doctor.require_oci(get_target("x86_64-linux"))
    assert "skopeo" in info.value.format_message()
    assert "apt install skopeo" in info.value.format_message()


def test_missing_runtime_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "which", lambda p: None)
    with pytest.raises(UserError) as info:
        doctor.require_runtime("docker")
    assert "apt install docker.io" in info.value.format_message()
    runtimes = {c.name: c for c in doctor.container_checks()}
    assert runtimes["runc"].package == "runc" and runtimes["runc"].required is False


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_unknown_format_and_runtime_are_one_error_line(tmp_path: Path) -> None:
    code, out = invoke("bake", "-t", "x86_64-linux", "-p", str(tmp_path), "--format", "docker")
    assert code == 2 and "Invalid value for '--format'" in out and "Traceback" not in out
    code, out = invoke("boot", str(tmp_path), "--node-id", "n", "--runtime", "lxc")
    assert code == 2 and "Invalid value for '--runtime'" in out


def test_boot_runtime_needs_a_container_image(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    image.touch()
    code, out = invoke("boot", str(image), "--node-id", "n", "--runtime", "runc")
    assert code != 0 and "is not a container image" in out
    layout = tmp_path / "x86_64-linux-oci"
    layout.mkdir()
    (layout / "index.json").write_text("{}")
    (layout / "oci-layout").write_text("{}")
    key = tmp_path / "k.pub"
    key.write_text(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE4k7V8b5u0VZ0ZQkqBJmBEV0wLyH9oR0dZx0r2o2X1p x\n"
    )
    code, out = invoke("boot", str(layout), "--node-id", "n", "--ssh-key", str(key))
    assert code != 0 and "no SSH server" in out
    code, out = invoke("boot", str(layout), "--node-id", "n", "--wait", "ssh")
    assert code != 0 and "no SSH server" in out
    code, out = invoke("boot", str(layout), "--node-id", "n", "--memory", "512")
    assert code == 2 and "Error: --memory: for VM images, not container nodes" in out


def test_cache_commands_cover_the_container_base(tmp_path: Path) -> None:
    from imagefactory.bake.ocibase import LAYER_INFO_NAME, LAYER_NAME, oci_cache

    with oci_cache(None).building("cd" * 32, {"arch": "arm64", "suite": "bookworm"}) as work:
        (work / LAYER_NAME).write_bytes(b"x" * 1000)
        (work / LAYER_INFO_NAME).write_text("{}")
    code, out = invoke("cache", "list", "--json")
    [entry] = json.loads(out)
    assert (entry["kind"], entry["arch"], entry["key"]) == ("oci", "arm64", "cd" * 32)
    code, out = invoke("cache", "prune")
    assert code == 0 and "removed cdcdcdcdcdcd" in out
    assert invoke("cache", "list", "--json")[1].strip() == "[]"


def test_engine_run_line(tmp_path: Path) -> None:
    from imagefactory.boot import engines

    argv = engines.run_argv(
        "podman", "fleetbake-n", "fleetbake/hello:x86_64-linux", "n", tmp_path / "env", tmp_path
    )
    assert argv[:3] == ["podman", "run", "--detach"]
    assert argv[-1] == "fleetbake/hello:x86_64-linux"
    pairs = dict(zip(argv, argv[1:], strict=False))
    assert pairs["--network"] == "none" and pairs["--cap-drop"] == "ALL"
    assert pairs["--volume"] == f"{tmp_path}:/var/lib/executor"
    assert "--read-only" in argv and pairs["--security-opt"] == "no-new-privileges"
    engines.write_env_file(tmp_path / "env", (("EXECUTOR_TOKEN", "t0k"), ("A", 'x "y" $z')))
    assert (tmp_path / "env").read_text() == 'EXECUTOR_TOKEN=t0k\nA=x "y" $z\n'
    assert (tmp_path / "env").stat().st_mode & 0o777 == 0o600


def test_engine_image_name_comes_from_the_manifest(tmp_path: Path) -> None:
    from imagefactory.boot import engines

    with pytest.raises(UserError, match="no manifest.json"):
        engines.image_name(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"oci": {"name": "fleetbake/x:y"}}))
    assert engines.image_name(tmp_path) == "fleetbake/x:y"
