"""Resolving real wheels from the package index for both targets, the lock file's
reproducibility, and a requirement without a wheel failing the bake before anything slow."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from imagefactory.bake import wheels
from imagefactory.bake.cache import sha256_file
from imagefactory.errors import UserError
from imagefactory.stages import Stages
from imagefactory.targets import get_target

# numpy has a C extension (one wheel per platform); six is pure Python.
REQUIREMENTS = "numpy>=1.26,<3\nsix==1.17.0\n"


@pytest.mark.parametrize(
    ("target_name", "arch"), [("x86_64-linux", "x86_64"), ("aarch64-linux", "aarch64")]
)
def test_real_wheels_for_each_target_and_the_lock_gives_them_again(
    tmp_path: Path, target_name: str, arch: str
) -> None:
    target = get_target(target_name)
    first = wheels.resolve(REQUIREMENTS, target, Stages(io.StringIO()), cache_dir=tmp_path / "a")
    assert first.source == "resolved"
    by_name = {w.name: w for w in first.wheels}
    assert set(by_name) == {"numpy", "six"}
    assert "cp311" in by_name["numpy"].file and "manylinux_2_" in by_name["numpy"].file
    assert by_name["numpy"].file.endswith(f"_{arch}.whl")
    assert by_name["six"].file.endswith("-none-any.whl")
    for wheel in first.wheels:
        assert sha256_file(first.dir / wheel.file) == wheel.sha256
        assert (
            f"{wheel.name}=={wheel.version} --hash=sha256:{wheel.sha256}" in first.lock.read_text()
        )
    assert first.pip_wheel.name.startswith("pip-") and first.pip_wheel.name.endswith(".whl")
    # The same inputs again: the cache, not the index.
    again = wheels.resolve(REQUIREMENTS, target, Stages(io.StringIO()), cache_dir=tmp_path / "a")
    assert again.source == "cached" and again.wheels == first.wheels
    # The lock in an empty cache: exactly the same wheels, downloaded by hash.
    lock = wheels.read_lock(first.lock)
    locked = wheels.resolve(REQUIREMENTS, target, Stages(io.StringIO()), lock, tmp_path / "b")
    assert locked.source == "locked" and locked.wheels == first.wheels
    assert locked.lock.read_text() == first.lock.read_text()


def test_a_requirement_without_a_wheel_for_the_platform_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UserError) as caught:
        wheels.resolve(
            "numpy==1.0\n", get_target("aarch64-linux"), Stages(io.StringIO()), cache_dir=tmp_path
        )
    assert str(caught.value).startswith(
        "numpy==1.0: no wheel for cp311-manylinux_2_36_aarch64 on the package index"
    )
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == []  # no half entry


def test_bake_fails_before_any_vm_when_a_requirement_has_no_wheel(tmp_path: Path) -> None:
    pipeline = tmp_path / "p"
    pipeline.mkdir()
    document = {"format": 1, "name": "p", "tasks": [{"id": "a", "call": "mod:f"}]}
    (pipeline / "pipeline.json").write_text(json.dumps(document))
    (pipeline / "mod.py").write_text("import numpy\n\ndef f(ctx):\n    return 1\n")
    (pipeline / "requirements.txt").write_text("numpy==1.0\n")
    result = subprocess.run(
        [sys.executable, "-m", "imagefactory", "bake", "--target", "x86_64-linux",
         "--pipeline", str(pipeline), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False,
        env={"IMAGEFACTORY_CACHE": str(tmp_path / "cache"), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "Error: numpy==1.0: no wheel for cp311-manylinux_2_36_x86_64 on the package index"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "base").exists()  # failed before the base was built
    assert not (tmp_path / "out" / "x86_64-linux").exists()
