"""The CI workflows and the Vagrantfile are checked by their own tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
ACTIONLINT = Path(sys.executable).parent / "actionlint"


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ACTIONLINT), "-no-color", *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_both_workflows_exist() -> None:
    assert [p.name for p in WORKFLOWS] == ["ci.yml", "nightly.yml"]


def test_workflows_pass_actionlint() -> None:
    result = actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n      - run:\n"
    )
    assert actionlint(broken).returncode != 0


def test_ci_workflow_runs_the_ci_entry_point() -> None:
    text = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    assert "bash .ci/run" in text
    assert "pull_request" in text


def test_nightly_covers_both_targets_with_slow_tests() -> None:
    text = (REPO / ".github" / "workflows" / "nightly.yml").read_text()
    assert "x86_64-linux" in text and "aarch64-linux" in text
    assert "--run-slow" in text and "schedule" in text


def test_ci_entry_point_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()


def _vagrant_validate(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["vagrant", "validate"], cwd=directory, capture_output=True, text=True, check=False
    )


vagrant_required = pytest.mark.skipif(
    shutil.which("vagrant") is None, reason="vagrant is not installed"
)


@vagrant_required
def test_vagrantfile_validates(tmp_path: Path) -> None:
    shutil.copy(REPO / "Vagrantfile", tmp_path / "Vagrantfile")
    result = _vagrant_validate(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@vagrant_required
def test_vagrant_validate_rejects_a_broken_vagrantfile(tmp_path: Path) -> None:
    text = (
        (REPO / "Vagrantfile")
        .read_text()
        .replace("libvirt.nested = true", "libvirt.nested_typo = true")
    )
    (tmp_path / "Vagrantfile").write_text(text)
    assert _vagrant_validate(tmp_path).returncode != 0
