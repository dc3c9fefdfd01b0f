"""The wheelhouse's platform, lock file and SBOM, without the package index."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from imagefactory.bake import wheels
from imagefactory.bake.sbom import PythonPackage, build_sbom
from imagefactory.errors import UserError
from imagefactory.stages import Stages
from imagefactory.targets import get_target

X86, ARM = get_target("x86_64-linux"), get_target("aarch64-linux")


def test_platform_lists_every_manylinux_tag_the_base_glibc_runs() -> None:
    x86 = wheels.WheelPlatform.of(X86)
    assert str(x86) == "cp311-manylinux_2_36_x86_64"
    tags = x86.platform_tags()
    assert tags[0] == "manylinux_2_36_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_37_x86_64" not in tags
    arm = wheels.WheelPlatform.of(ARM).platform_tags()
    assert arm[-1] == "manylinux2014_aarch64" and "manylinux_2_16_aarch64" not in arm
    args = x86.pip_args()
    assert args[0] == "--only-binary=:all:" and args.count("--platform") == len(tags)
    assert args[-6:] == ["--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]


def _lock(tmp_path: Path, requirements: str = "numpy\n", target: str = "x86_64-linux") -> Path:
    wheel = wheels.Wheel("numpy", "2.0.0", "numpy-2.0.0-cp311-cp311-x.whl", "c" * 64)
    text = wheels.lock_text(
        get_target(target), wheels.WheelPlatform.of(get_target(target)), requirements, [wheel]
    )
    path = tmp_path / f"{target}.lock"
    path.write_text(text)
    return path


def test_lock_round_trip_and_pick_by_target(tmp_path: Path) -> None:
    x86_lock, arm_lock = _lock(tmp_path), _lock(tmp_path, target="aarch64-linux")
    assert f"numpy==2.0.0 --hash=sha256:{'c' * 64}\n" in x86_lock.read_text()
    lock = wheels.read_lock(x86_lock)
    assert (lock.target, lock.platform) == ("x86_64-linux", "cp311-manylinux_2_36_x86_64")
    picked = wheels.pick_lock([arm_lock, x86_lock], ARM)
    assert picked is not None and picked.platform.endswith("aarch64")
    assert wheels.pick_lock([x86_lock], ARM) is None


def test_a_stale_or_foreign_lock_is_refused_before_any_download(tmp_path: Path) -> None:
    lock = wheels.read_lock(_lock(tmp_path, "numpy\n"))
    with pytest.raises(UserError, match="written for another requirements.txt"):
        wheels.resolve("numpy>=2\n", X86, Stages(io.StringIO()), lock, tmp_path / "cache")
    with pytest.raises(UserError, match="the lock file is for cp311-manylinux_2_36_x86_64"):
        wheels.resolve("numpy\n", ARM, Stages(io.StringIO()), lock, tmp_path / "cache")
    assert not (tmp_path / "cache" / "wheels").exists()


def test_a_file_without_the_header_is_not_a_lock(tmp_path: Path) -> None:
    path = tmp_path / "requirements.txt"
    path.write_text("numpy==2.0.0\n")
    with pytest.raises(UserError, match="is not a lock file written by `imagefactory bake`"):
        wheels.read_lock(path)


def test_a_tampered_cache_entry_is_refused(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    (entry / wheels.PIP_DIR).mkdir(parents=True)
    (entry / wheels.PIP_DIR / "pip-26.0-py3-none-any.whl").write_bytes(b"pip")
    (entry / "six-1.17.0-py2.py3-none-any.whl").write_bytes(b"not the wheel that was locked")
    (entry / wheels.LOCK_NAME).write_text(f"six==1.17.0 --hash=sha256:{'d' * 64}\n")
    with pytest.raises(UserError, match="do not match its lock file"):
        wheels._load(entry, "key", "cached")


def test_sbom_is_valid_cyclonedx_and_reproducible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    args = (
        "x86_64-linux qcow2",
        "numeric",
        "e" * 64,
        [{"name": "libgomp1", "version": "12.2.0-14", "arch": "amd64"}],
        [PythonPackage("executor", "0.1.0"), PythonPackage("numpy", "2.4.6", "f" * 64)],
    )
    document = build_sbom(*args)
    assert JsonStrictValidator(SchemaVersion.V1_5).validate_str(document) is None
    assert build_sbom(*args) == document
    parsed = json.loads(document)
    purls = {c.get("purl") for c in parsed["components"]}
    assert "pkg:deb/debian/libgomp1@12.2.0-14?arch=amd64&distro=debian-12" in purls
    assert "pkg:pypi/numpy@2.4.6" in purls
    [pipeline] = [c for c in parsed["components"] if c["name"] == "numeric"]
    assert pipeline["hashes"] == [{"alg": "SHA-256", "content": "e" * 64}]
    assert parsed["metadata"]["timestamp"].startswith("2023-11-14T22:13:20")
