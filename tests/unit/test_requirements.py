"""What a pipeline declares it needs: requirements.txt, `debian_packages`, and how loading,
packing and the bake's host check treat requirements this Python lacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from executor.pack import pack
from executor.pipeline import MissingRequirements, PipelineError, load_pipeline
from executor.requirements import (
    RequirementsError,
    check_debian_packages,
    parse_requirements,
    unmet,
)

HASH_A, HASH_B = "a" * 64, "b" * 64


def test_requirement_lines_with_markers_extras_hashes_and_continuations() -> None:
    text = (
        "# a comment line\n"
        "\n"
        'numpy>=1.26,<3 ; python_version >= "3.11" \\\n'
        f"    --hash=sha256:{HASH_A} --hash sha256:{HASH_B}\n"
        "requests[socks]==2.31  # why we pin it\n"
        'Numpy==1.24; python_version < "3.9"\n'
    )
    first, second, third = parse_requirements(text)
    assert (first.line, first.name, first.hashes) == (3, "numpy", (HASH_A, HASH_B))
    assert str(first.requirement.specifier) == "<3,>=1.26"
    assert second.line == 5 and second.requirement.extras == {"socks"} and second.hashes == ()
    # The same package once more under another marker is an alternative, not a duplicate.
    assert third.name == "numpy" and third.line == 6


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("-r other.txt\n", "line 1: option '-r' is not supported"),
        ("six\n--index-url https://example.org/simple\n", "line 2: option '--index-url'"),
        ("-e ./local\n", "line 1: option '-e'"),
        ("numpy --pre\n", "line 1: option '--pre' is not supported"),
        (f"six --hash=md5:{HASH_A[:32]}\n", "line 1: option '--hash=md5:"),
        ("pkg @ https://example.org/pkg.whl\n", "line 1: pkg names a URL"),
        ("numpy>=\n", "line 1: 'numpy>=' is not a requirement"),
        ("./some/dir\n", "line 1: './some/dir' is not a requirement"),
        ("six\nSix>1\n", "line 2: 'Six' is already required on line 1"),
        ("six \\\n", "line 1: the file ends inside a '\\' continuation"),
    ],
)
def test_unusable_lines_are_refused_with_their_line(text: str, problem: str) -> None:
    with pytest.raises(RequirementsError) as caught:
        parse_requirements(text)
    assert str(caught.value).startswith(problem)
    assert "\n" not in str(caught.value)


def test_unmet_names_missing_and_wrong_versions_and_skips_other_platforms() -> None:
    declared = parse_requirements(
        "click>=1\n"
        "surely-not-installed-pkg-0\n"
        "tenacity<1\n"
        'other-os-only ; sys_platform == "win32"\n'
    )
    problems = unmet(declared)
    assert problems[0] == "surely-not-installed-pkg-0: not installed"
    assert problems[1].startswith("tenacity<1: version ") and problems[1].endswith(" is installed")
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("libgomp1", "must be a list of package names"),
        (["libgomp1", 3], "must be a list of package names"),
        (["LibGomp1"], "'LibGomp1' is not a Debian package name"),
        (["x"], "'x' is not a Debian package name"),
        (["libgomp1; rm -rf /"], "is not a Debian package name"),
        (["libgomp1", "libgomp1"], "lists a package twice"),
    ],
)
def test_debian_packages_are_checked(value: object, problem: str) -> None:
    with pytest.raises(RequirementsError, match="debian_packages"):
        check_debian_packages(value)
    with pytest.raises(RequirementsError) as caught:
        check_debian_packages(value)
    assert problem in str(caught.value)


def test_debian_packages_accepted() -> None:
    assert check_debian_packages(["libgomp1", "g++-12", "libc6.1"]) == (
        "libgomp1",
        "g++-12",
        "libc6.1",
    )


def _pipeline(root: Path, requirements: str | None, **top: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    document = {"format": 1, "name": "p", "tasks": [{"id": "a", "call": "mod:f"}], **top}
    (root / "pipeline.json").write_text(json.dumps(document))
    (root / "mod.py").write_text("import surely_not_installed_pkg_0\n\ndef f(ctx):\n    return 1\n")
    if requirements is not None:
        (root / "requirements.txt").write_text(requirements)
    return root


def test_missing_requirement_is_named_before_any_import(tmp_path: Path) -> None:
    root = _pipeline(tmp_path / "p", "surely-not-installed-pkg-0>=1\n")
    with pytest.raises(MissingRequirements) as caught:
        load_pipeline(root)
    assert caught.value.lines == [
        f"{root / 'requirements.txt'}: surely-not-installed-pkg-0>=1: not installed"
    ]


def test_a_host_that_only_packs_skips_the_imports_and_says_so(tmp_path: Path) -> None:
    root = _pipeline(
        tmp_path / "p", "surely-not-installed-pkg-0>=1\n", debian_packages=["libgomp1"]
    )
    pipeline = load_pipeline(root, imports="when-installed")
    assert not pipeline.imports_checked
    assert pipeline.debian_packages == ("libgomp1",)
    assert [d.name for d in pipeline.requirements] == ["surely-not-installed-pkg-0"]
    archive = tmp_path / "p.tar.gz"
    pack(root, archive)  # packs without the package installed...
    again = load_pipeline(archive, imports="when-installed")  # ...and requirements.txt travels
    assert [d.name for d in again.requirements] == ["surely-not-installed-pkg-0"]
    with pytest.raises(MissingRequirements) as caught:
        load_pipeline(archive)
    assert caught.value.lines[0].startswith(f"{archive}: surely-not-installed-pkg-0")


def test_when_installed_still_checks_imports_once_requirements_are_met(tmp_path: Path) -> None:
    root = _pipeline(tmp_path / "p", "click\n")
    with pytest.raises(PipelineError, match="surely_not_installed_pkg_0"):
        load_pipeline(root, imports="when-installed")


def test_bad_requirements_file_is_one_line_naming_the_file(tmp_path: Path) -> None:
    root = _pipeline(tmp_path / "p", "-r more.txt\n")
    with pytest.raises(PipelineError) as caught:
        load_pipeline(root, imports="when-installed")
    assert str(caught.value) == (
        f"{root / 'requirements.txt'}: line 1: option '-r' is not supported here (the bake "
        "resolves wheels from the package index; only requirements and --hash may be given)"
    )
    (root / "requirements.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(PipelineError, match="requirements.txt is not UTF-8 text"):
        load_pipeline(root, imports="when-installed")


def test_bad_debian_packages_key_is_a_pipeline_error(tmp_path: Path) -> None:
    root = _pipeline(tmp_path / "p", None, debian_packages=["Bad Name"])
    with pytest.raises(PipelineError) as caught:
        load_pipeline(root, imports="when-installed")
    assert str(caught.value).startswith(f"{root / 'pipeline.json'}: 'debian_packages': 'Bad Name'")
