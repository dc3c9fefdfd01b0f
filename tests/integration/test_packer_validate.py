"""Every target's rendered HCL2 is accepted by the installed Packer (`packer validate`)
and is in canonical format (`packer fmt -check`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from imagefactory.bake import packer
from imagefactory.cli.main import main
from imagefactory.run import CommandError
from imagefactory.targets import target_names

pytestmark = pytest.mark.skipif(shutil.which("packer") is None, reason="packer not installed")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEFACTORY_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("target", target_names())
def test_rendered_target_validates(tmp_path: Path, target: str) -> None:
    result = CliRunner().invoke(main, ["render", "--target", target, "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    hcl = Path(result.output.strip())
    assert hcl == tmp_path / target / "packer"
    packer.validate(hcl)  # raises CommandError with Packer's complaint
    fmt = subprocess.run(["packer", "fmt", "-check", str(hcl)], capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout


def test_validate_catches_a_broken_template(tmp_path: Path) -> None:
    """The check above can fail: an unknown argument is rejected."""
    result = CliRunner().invoke(main, ["render", "--target", "x86_64-linux", "-o", str(tmp_path)])
    hcl = Path(result.output.strip())
    source = hcl / "fleetbake.pkr.hcl"
    source.write_text(source.read_text().replace("disk_image", "disk_imagez", 1))
    with pytest.raises(CommandError) as info:
        packer.validate(hcl)
    assert "disk_imagez" in str(info.value)


def test_bad_packer_version_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["render", "-t", "x86_64-linux", "-o", str(tmp_path), "--packer-version", "new"]
    )
    assert result.exit_code == 2 and "bad --packer-version 'new'" in result.output
