"""docs/reference/ stays in step with the code it documents.

- openapi.json is exactly what scripts/export_openapi.py writes now;
- every EXECUTOR_* variable the executor's code names is in environment.md;
- no file of the repository points to the design document that is not in it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import ModuleType

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "docs" / "reference"
# EXECUTOR_ followed by a name; a match ending in "_" is a prefix ("EXECUTOR_PIPELINE_MAX_*").
VARIABLE = re.compile(r"\bEXECUTOR_[A-Z0-9_]+")


def _exporter() -> ModuleType:
    return load_script("export_openapi")


def _variables(text: str) -> set[str]:
    return {name for name in VARIABLE.findall(text) if not name.endswith("_")}


def test_openapi_json_is_current() -> None:
    exporter = _exporter()
    expected: str = exporter.render()
    path = REFERENCE / "openapi.json"
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    assert current == expected, (
        f"{path.relative_to(REPO)} is stale (the server's OpenAPI document changed); "
        f"regenerate it with: {exporter.REGENERATE}"
    )


def test_environment_md_names_every_executor_variable() -> None:
    in_code: dict[str, str] = {}
    for source in sorted((REPO / "executor").rglob("*.py")):
        for name in _variables(source.read_text(encoding="utf-8")):
            in_code.setdefault(name, str(source.relative_to(REPO)))
    assert in_code, "found no EXECUTOR_* variable in executor/: is the pattern still right?"
    documented = _variables((REFERENCE / "environment.md").read_text(encoding="utf-8"))
    missing = {name: where for name, where in sorted(in_code.items()) if name not in documented}
    assert not missing, f"docs/reference/environment.md does not describe: {missing}"


def test_no_file_mentions_the_design_document() -> None:
    needle = "DESIGN" + ".md"  # in two parts, so that this file does not match itself
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    offenders = []
    for name in filter(None, listed):
        path = REPO / name.decode("utf-8", "surrogateescape")
        if path.is_file() and needle.encode() in path.read_bytes():
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders, (
        f"{needle} is not part of this repository; point these at docs/reference/: {offenders}"
    )
