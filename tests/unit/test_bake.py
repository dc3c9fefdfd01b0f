"""`imagefactory bake` bad input (one clear line, non-zero exit, no traceback), target
resolution, and the atomic publish/compress helpers."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagefactory.bake import packer
from imagefactory.bake import vm as bake_mod
from imagefactory.bake.options import BakeOptions, publish
from imagefactory.cli.bake import resolve_targets
from imagefactory.cli.main import main
from imagefactory.errors import UserError
from imagefactory.host import doctor
from imagefactory.targets import target_names

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def executor_validate(path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "executor", "validate", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    return proc.stderr.strip()


def test_unknown_target_lists_the_valid_ones() -> None:
    code, out = invoke("bake", "--target", "sparc-linux", "--pipeline", str(HELLO))
    assert code == 2
    assert "unknown target 'sparc-linux'" in out
    for name in [*target_names(), "all"]:
        assert name in out


@pytest.mark.parametrize("case", ["missing", "bad-json", "cycle"])
def test_invalid_pipeline_gives_the_executor_validate_message(tmp_path: Path, case: str) -> None:
    pipeline = tmp_path / "p"
    if case != "missing":
        pipeline.mkdir()
        doc = "{not json" if case == "bad-json" else json.dumps({
            "format": 1, "name": "c", "tasks": [
                {"id": "a", "call": "m:f", "after": ["b"]},
                {"id": "b", "call": "m:f", "after": ["a"]}]})  # fmt: skip
        (pipeline / "pipeline.json").write_text(doc)
        (pipeline / "m.py").write_text("def f(ctx):\n    return 1\n")
    code, out = invoke("bake", "--target", "x86_64-linux", "--pipeline", str(pipeline))
    assert code == 2
    expected = executor_validate(pipeline)
    assert out.strip() == f"Error: {expected.removeprefix('Error: ')}"
    assert len(out.strip().splitlines()) == 1


def test_base_sha256_needs_base_image() -> None:
    code, out = invoke("bake", "-t", "x86_64-linux", "-p", str(HELLO), "--base-sha256", "00")
    assert code == 2 and "--base-sha256 needs --base-image" in out


@pytest.mark.parametrize("size", ["abc", "0G", "8 G", "-1"])
def test_bad_disk_size_is_refused(size: str) -> None:
    code, out = invoke("bake", "-t", "x86_64-linux", "-p", str(HELLO), "--disk-size", size)
    assert code == 2 and "is not a size like 8G" in out


def test_bad_format_is_refused_by_click() -> None:
    code, out = invoke("bake", "-t", "x86_64-linux", "-p", str(HELLO), "--format", "vmdk")
    assert code == 2 and "vmdk" in out


def test_missing_host_tools_give_the_doctor_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(doctor, "which", lambda p: None)
    monkeypatch.setattr(doctor, "kvm_status", lambda t: (False, "test"))
    code, out = invoke("bake", "-t", "x86_64-linux", "-p", str(HELLO), "-o", str(tmp_path))
    assert code == 2
    assert "missing host tools for x86_64-linux" in out and "imagefactory doctor" in out
    assert "apt install mmdebstrap" in out
    assert list(tmp_path.iterdir()) == []  # nothing half-made


def test_given_base_must_match_its_sha256(tmp_path: Path) -> None:
    from imagefactory.bake.base import given_base
    from imagefactory.bake.cache import BaseCache
    from imagefactory.stages import Stages

    image = tmp_path / "cloud.qcow2"
    image.write_bytes(b"qcow")
    with pytest.raises(UserError, match="sha256 is"):
        given_base(str(image), "0" * 64, BaseCache(tmp_path), Stages())
    with pytest.raises(UserError, match="64 hex"):
        given_base(str(image), "xyz", BaseCache(tmp_path), Stages())
    with pytest.raises(UserError, match="no such base image"):
        given_base(str(tmp_path / "nope"), "0" * 64, BaseCache(tmp_path), Stages())
    sha = hashlib.sha256(b"qcow").hexdigest()
    found = given_base(str(image), sha.upper(), BaseCache(tmp_path), Stages(io.StringIO()))
    assert (found.image, found.sha256, found.source) == (image, sha, "given")


def test_all_means_buildable_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "can_build", lambda t: t.name == "x86_64-linux")
    assert [t.name for t in resolve_targets("all")] == ["x86_64-linux"]
    monkeypatch.setattr(doctor, "can_build", lambda t: False)
    with pytest.raises(UserError, match="can build no target"):
        resolve_targets("all")


def test_publish_replaces_the_old_output_whole(tmp_path: Path) -> None:
    final = tmp_path / "x86_64-linux"
    final.mkdir()
    (final / "old.qcow2").write_text("old")
    scratch = tmp_path / ".scratch"
    scratch.mkdir()
    (scratch / "new.qcow2").write_text("new")
    publish(scratch, final)
    assert [p.name for p in final.iterdir()] == ["new.qcow2"]
    assert [p.name for p in tmp_path.iterdir()] == ["x86_64-linux"]


@pytest.mark.parametrize(
    ("fmt", "argv"),
    [
        (
            "qcow2",
            ["qemu-img", "convert", "-c", "-o", "compression_type=zstd", "-O", "qcow2", "/a", "/b"],
        ),
        ("raw", ["qemu-img", "convert", "-O", "raw", "/a", "/b"]),
    ],
)
def test_compress_argv(fmt: str, argv: list[str]) -> None:
    assert bake_mod.compress_argv(Path("/a"), Path("/b"), fmt) == argv


@pytest.fixture
def offline_bake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """bake() with the host checks, base and Packer replaced; qemu-img stays real."""
    from imagefactory.bake.base import BaseImage

    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", base, "16M"], check=True,
                   capture_output=True)  # fmt: skip
    monkeypatch.setattr(bake_mod, "require", lambda t: None)
    monkeypatch.setattr(bake_mod, "pick_accelerator", lambda t: "tcg")
    monkeypatch.setattr(packer, "packer_version", lambda: (1, 6, 6))
    monkeypatch.setattr(
        bake_mod, "build_base",
        lambda spec, cache, stages: BaseImage(base, "ab" * 32, "k" * 64, {}, "cached"),
    )  # fmt: skip
    return base


def _bake_opts(tmp_path: Path) -> BakeOptions:
    from imagefactory.targets import get_target

    return BakeOptions(get_target("x86_64-linux"), HELLO, tmp_path / "out")


def test_failed_build_leaves_no_partial_output(
    offline_bake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagefactory.errors import die
    from imagefactory.stages import Stages

    def failing_build(hcl: Path, log: Path, stages: Stages) -> None:
        log.write_text("packer said no\n")
        raise die("packer build failed")

    monkeypatch.setattr(packer, "build", failing_build)
    with pytest.raises(UserError):
        bake_mod.bake(_bake_opts(tmp_path), Stages(io.StringIO()))
    out = tmp_path / "out"
    assert [p.name for p in out.iterdir()] == ["x86_64-linux.packer.log"]


def test_successful_build_is_published_whole(
    offline_bake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imagefactory.stages import Stages

    def fake_build(hcl: Path, log: Path, stages: Stages) -> None:
        work = hcl.parent
        (work / "packer-output").mkdir()
        shutil.copyfile(offline_bake, work / "packer-output" / "x86_64-linux.qcow2")
        (work / "report" / "packages.tsv").write_text("python3\t3.11.2\tamd64\n")
        (work / "report" / "guest.env").write_text("python=3.11.2\n")
        log.write_text("built\n")

    monkeypatch.setattr(packer, "build", fake_build)
    result = bake_mod.bake(_bake_opts(tmp_path), Stages(io.StringIO()))
    out = tmp_path / "out"
    assert [p.name for p in out.iterdir()] == ["x86_64-linux"]
    assert sorted(p.name for p in result.dir.iterdir()) == [
        "SHA256SUMS", "logs", "manifest.json", "sbom.cdx.json", "x86_64-linux.qcow2",
    ]  # fmt: skip
    assert (result.dir / "logs" / "packer.log").read_text() == "built\n"
    doc = json.loads((result.dir / "manifest.json").read_text())
    assert doc["image"]["sha256"] == hashlib.sha256(result.image.read_bytes()).hexdigest()
    assert doc["packages"] == [{"name": "python3", "version": "3.11.2", "arch": "amd64"}]
    assert doc["sbom"]["file"] == "sbom.cdx.json"
    assert (
        doc["sbom"]["sha256"]
        == hashlib.sha256((result.dir / "sbom.cdx.json").read_bytes()).hexdigest()
    )
    assert "requirements_lock" not in doc  # the pipeline declares no Python requirements
    assert {"artifacts", "compress", "total"} <= set(doc["stages_s"])
