"""What a pipeline declares it needs: `requirements.txt` (pip's format) and Debian packages.

The requirements file is read in the subset of pip's format that can be resolved
offline into a wheelhouse: one PEP 508 requirement per line (name, extras, version
specifiers, environment markers), each optionally followed by `--hash=sha256:<hex>`
options; comments, blank lines and `\\` continuations. Everything that would reach for
the network or another file (`-r`, `-e`, `--index-url`, direct URLs, local paths) is
refused with the line it is on, because a bake must resolve the same set every time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

REQUIREMENTS_FILE = "requirements.txt"

# Debian policy: lower case letters, digits, + - . ; at least two characters, starting
# with a letter or digit.
_DEBIAN_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_HASH = re.compile(r"--hash[= ]sha256:([0-9a-f]{64})")
_COMMENT = re.compile(r"(^|\s)#.*$")


class RequirementsError(ValueError):
    """A declaration that cannot be used; str() names the line and the problem."""


@dataclass(frozen=True)
class Declared:
    """One requirement line."""

    line: int
    requirement: Requirement
    hashes: tuple[str, ...]
    """sha256 hex digests pip must see one of (empty: not pinned by hash)."""

    @property
    def name(self) -> str:
        return canonicalize_name(self.requirement.name)

    def __str__(self) -> str:
        return str(self.requirement)


def parse_requirements(text: str) -> tuple[Declared, ...]:
    """Parse a requirements file; RequirementsError on the first unusable line."""
    found: list[Declared] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in _logical_lines(text):
        declared = _parse_line(number, line)
        if declared is None:
            continue
        # The same package may appear once per environment marker (alternatives).
        key = (declared.name, str(declared.requirement.marker))
        if key in seen:
            raise RequirementsError(
                f"line {number}: {declared.requirement.name!r} is already required on line "
                f"{seen[key]} (one line per package and marker)"
            )
        seen[key] = number
        found.append(declared)
    return tuple(found)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first physical line number, text) with comments removed and `\\` lines joined."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.sub("", raw)
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        if joined:
            lines.append((start, joined))
    if pending and " ".join(pending).strip():
        raise RequirementsError(f"line {start}: the file ends inside a '\\' continuation")
    return lines


def _parse_line(number: int, line: str) -> Declared | None:
    if line.startswith("-"):
        option = line.split()[0].split("=")[0]
        raise RequirementsError(
            f"line {number}: option {option!r} is not supported here (the bake resolves "
            "wheels from the package index; only requirements and --hash may be given)"
        )
    spec, dashes, rest = line.partition(" --")
    hashes = []
    for option in re.split(r"\s+(?=--)", dashes.strip() + rest) if dashes else ():
        match = _HASH.fullmatch(option.strip())
        if match is None:
            raise RequirementsError(
                f"line {number}: option {option.split()[0]!r} is not supported "
                "(only --hash=sha256:<hex> may follow a requirement)"
            )
        hashes.append(match[1])
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as exc:
        problem = str(exc).splitlines()[0]
        raise RequirementsError(
            f"line {number}: {spec!r} is not a requirement: {problem}"
        ) from None
    if requirement.url:
        raise RequirementsError(
            f"line {number}: {requirement.name} names a URL; give a version instead "
            "(the bake resolves wheels from the package index)"
        )
    return Declared(number, requirement, tuple(hashes))


def check_debian_packages(value: object) -> tuple[str, ...]:
    """The `debian_packages` value of pipeline.json, checked; RequirementsError if bad."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequirementsError("'debian_packages' must be a list of package names")
    for name in value:
        if not _DEBIAN_PACKAGE.fullmatch(name):
            raise RequirementsError(
                f"'debian_packages': {name!r} is not a Debian package name "
                "(lower case letters, digits, '+', '-', '.')"
            )
    if len(set(value)) != len(value):
        raise RequirementsError("'debian_packages' lists a package twice")
    return tuple(value)


def unmet(declared: tuple[Declared, ...]) -> list[str]:
    """One line per requirement the running Python does not satisfy (markers that do not
    apply here are skipped), e.g. `numpy>=1.26: not installed`."""
    problems = []
    for item in declared:
        requirement = item.requirement
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement}: not installed")
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement}: version {version} is installed")
    return problems


def applies(declared: Declared, environment: dict[str, str]) -> bool:
    """Whether the requirement's marker holds in a target's environment (PEP 508 names)."""
    marker: Marker | None = declared.requirement.marker
    return marker is None or marker.evaluate(environment)
