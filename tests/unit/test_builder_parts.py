"""The builder's pure parts: the bake command line, reading stages off the bake's output,
registry names and the skopeo command line; and the upload loop against a fake master."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from imagefactory import stages
from imagefactory.builder.bakeproc import Progress, bake_argv
from imagefactory.builder.master import Refused
from imagefactory.builder.push import registry_destination, repository_name, skopeo_copy_argv
from imagefactory.builder.upload import sha256_digest, upload
from imagefactory.builder.worker import BuilderConfig
from imagefactory.tokens import builder_token, node_token


def test_bake_argv_runs_the_same_bake_a_user_runs() -> None:
    argv = bake_argv("x86_64-linux", "qcow2", Path("/w/p.tar.gz"), Path("/w/out"))
    assert argv == [
        sys.executable, "-m", "imagefactory", "bake", "--target", "x86_64-linux",
        "--format", "qcow2", "--pipeline", "/w/p.tar.gz", "--output", "/w/out", "--json",
    ]  # fmt: skip


def test_progress_reads_stages_and_keeps_every_line() -> None:
    progress = Progress()
    lines = [
        "==> base: building Debian bookworm",
        "    detail line",
        "==> base: done in 81.2s",
        "==> packer: provisioning",
        "==> bad name!: ignored as a stage",
        "x" * 20000,
    ]
    for line in lines:
        progress.see(line)
    assert progress.stages == {"base": 81.2}
    assert progress.stage == "packer"
    assert progress.pending[:5] == lines[:5] and len(progress.pending[5]) == 16384
    progress.see("==> packer: done in 3s")
    assert progress.stage is None and progress.stages == {"base": 81.2, "packer": 3.0}


@pytest.mark.parametrize(
    ("pipeline", "name"),
    [("etl", "etl"), ("ETL_demo..v2", "etl-demo-v2"), ("a.b-c_d", "a-b-c-d"), ("_", "pipeline")],
)
def test_repository_names(pipeline: str, name: str) -> None:
    assert repository_name(pipeline) == name


@pytest.mark.parametrize(
    ("registry", "destination", "verify"),
    [
        ("http://127.0.0.1:5000", "docker://127.0.0.1:5000/r/x:1", False),
        ("http://127.0.0.1:5000/", "docker://127.0.0.1:5000/r/x:1", False),
        ("https://registry.example", "docker://registry.example/r/x:1", True),
        ("registry.example:5000", "docker://registry.example:5000/r/x:1", True),
    ],
)
def test_registry_destination(registry: str, destination: str, verify: bool) -> None:
    assert registry_destination(registry, "r/x:1") == (destination, verify)
    argv = skopeo_copy_argv(Path("/l"), destination, verify, Path("/d"))
    assert argv == [
        "skopeo", "copy", "--quiet", f"--dest-tls-verify={str(verify).lower()}",
        "--digestfile", "/d", "oci:/l", destination,
    ]  # fmt: skip


def test_builder_tokens_are_their_own_namespace() -> None:
    assert builder_token("s", "b1") == node_token("s", "builder:b1")
    assert builder_token("s", "b1") != node_token("s", "b1")
    assert builder_token("s", "b1") != builder_token("t", "b1")


class FakeMaster:
    """Holds an upload as the master does: an offset, and the bytes received."""

    def __init__(self, drop_after: int | None = None, max_body: int | None = None) -> None:
        self.max_body = max_body
        self.data = b""
        self.stored = False
        self.drop_after = drop_after
        self.calls = 0

    def upload_status(self, _b: str, _a: int, _digest: str, _size: int) -> tuple[int, bool]:
        return len(self.data), self.stored

    def upload_chunk(
        self, _b: str, _a: int, digest: str, size: int, offset: int, chunk: bytes
    ) -> tuple[int, bool]:
        self.calls += 1
        if self.drop_after is not None and self.calls > self.drop_after:
            raise ConnectionError("master went away")
        if self.max_body is not None and len(chunk) > self.max_body:
            raise Refused(413, "request body too large", {"error": "too large"})
        assert offset == len(self.data)
        self.data += chunk
        if len(self.data) == size:  # verified once whole, then stored
            assert "sha256:" + hashlib.sha256(self.data).hexdigest() == digest
            self.stored = True
        return len(self.data), self.stored


def test_upload_resumes_where_the_master_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagefactory.builder.upload as up

    monkeypatch.setattr(up, "CHUNK_BYTES", 1000)
    path = tmp_path / "image"
    data = bytes(range(256)) * 20
    path.write_bytes(data)
    digest = sha256_digest(path)
    master = FakeMaster(drop_after=2)
    with pytest.raises(ConnectionError):
        upload(master, "b", 1, path, digest)  # type: ignore[arg-type]
    assert master.data == data[:2000]
    master.drop_after = None
    upload(master, "b", 1, path, digest)  # type: ignore[arg-type]
    assert master.data == data
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    nothing = FakeMaster()
    upload(nothing, "b", 1, empty, sha256_digest(empty))  # type: ignore[arg-type]
    assert nothing.calls == 1, "an empty file is sent as one empty chunk"


def test_upload_halves_its_chunks_for_a_smaller_body_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import imagefactory.builder.upload as up

    monkeypatch.setattr(up, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(up, "MIN_CHUNK_BYTES", 512)
    path = tmp_path / "image"
    path.write_bytes(bytes(range(256)) * 40)
    master = FakeMaster(max_body=1000)
    upload(master, "b", 1, path, sha256_digest(path))  # type: ignore[arg-type]
    assert master.data == path.read_bytes()
    tiny = FakeMaster(max_body=100)
    with pytest.raises(Refused):
        upload(tiny, "b", 1, path, sha256_digest(path))  # type: ignore[arg-type]


def test_formats_need_their_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    import imagefactory.builder.capabilities as caps
    from imagefactory.host.doctor import Check

    present = {"dpkg-deb", "skopeo"}
    monkeypatch.setattr(
        caps, "tool_check", lambda program, package: Check(program, program in present, "", package)
    )
    formats = ["qcow2", "raw", "oci", "installer", "future"]
    assert caps.buildable_formats(formats) == ("installer", "future")
    present.add("mmdebstrap")
    assert caps.buildable_formats(formats) == ("oci", "installer", "future")


def test_a_cancelled_bake_may_outwait_its_own_tools_stop() -> None:
    """The builder SIGKILLs a cancelled bake only after the bake has had time to SIGTERM
    Packer (or mmdebstrap), wait, and SIGKILL it: sooner, the tool is left to itself."""
    from imagefactory.cli.builder import builder_command

    tools_stop = stages.TOOL_GRACE_S + stages.TOOL_KILL_WAIT_S
    (grace,) = [p.default for p in builder_command.params if p.name == "grace_seconds"]
    assert isinstance(grace, float) and grace > tools_stop
    assert BuilderConfig("b", Path("/w"), (), ()).grace_s == grace
