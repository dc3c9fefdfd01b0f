"""A pipeline's Python requirements as a wheelhouse for one target, resolved on the host.

    requirements.txt ─► pip download (target's platform, Python, binary only) ─► wheels
      + sha256 of each ─► requirements.lock ─► cached under CACHE/wheels/<key>/
    requirements.lock (--lock) ─► pip download --require-hashes --no-deps ─► same wheels

The environment then installs them offline (`pip install --no-index --require-hashes`),
so neither the build VM nor a node ever reaches a package index. The lock file names its
target, platform and the sha256 of the requirements it was resolved from; a bake given a
lock downloads exactly the wheels it lists, or fails.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

from imagefactory.bake.cache import sha256_file
from imagefactory.errors import die
from imagefactory.paths import cache_root
from imagefactory.run import CommandError, run
from imagefactory.stages import Stages
from imagefactory.targets import Target

WHEELS_RECIPE = 1
"""Bump when the resolution steps change in a way the key's other inputs do not show."""
LOCK_NAME = "requirements.lock"
PIP_DIR = "pip"
"""Where the wheelhouse keeps pip's own wheel, which installs the others in the guest."""

# Python and glibc of each Debian suite a base is built from: the wheels' platform.
SUITES = {"bookworm": ("3.11", "2.36")}

_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")
_PINNED_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")
_HEADER = re.compile(r"# fleetbake-lock ([\w-]+)=(\S+)")


@dataclass(frozen=True)
class WheelPlatform:
    """What a wheel must be built for to run in a target's environment."""

    arch: str
    python: str
    """`3.11`."""
    glibc: str
    """`2.36`: manylinux wheels up to this glibc version fit."""

    @classmethod
    def of(cls, target: Target, suite: str = "bookworm") -> WheelPlatform:
        python, glibc = SUITES[suite]
        return cls(target.arch, python, glibc)

    @property
    def tag(self) -> str:
        return f"manylinux_{self.glibc.replace('.', '_')}_{self.arch}"

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def __str__(self) -> str:
        return f"{self.abi}-{self.tag}"

    def platform_tags(self) -> list[str]:
        """Every manylinux tag this glibc runs, newest first: pip takes a --platform
        literally, without the older glibc versions it implies."""
        newest = int(self.glibc.split(".")[1])
        oldest = 5 if self.arch in ("x86_64", "i686") else 17
        tags = [f"manylinux_2_{minor}_{self.arch}" for minor in range(newest, oldest - 1, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.arch}" for minor, name in legacy.items() if minor >= oldest]
        return tags

    def pip_args(self) -> list[str]:
        platforms = [arg for tag in self.platform_tags() for arg in ("--platform", tag)]
        return [
            "--only-binary=:all:",
            *platforms,
            "--python-version", self.python,
            "--implementation", "cp",
            "--abi", self.abi,
        ]  # fmt: skip


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    file: str
    sha256: str


@dataclass(frozen=True)
class Wheelhouse:
    """The resolved wheels of one target, ready to copy into an environment."""

    dir: Path
    wheels: tuple[Wheel, ...]
    lock: Path
    """requirements.lock: every wheel pinned by version and sha256."""
    pip_wheel: Path
    key: str
    source: str
    """`resolved`, `locked` or `cached`."""


@dataclass(frozen=True)
class Lock:
    """A parsed requirements.lock."""

    target: str
    platform: str
    requirements_sha256: str
    text: str


def lock_text(
    target: Target, platform: WheelPlatform, requirements: str, wheels: list[Wheel]
) -> str:
    header = [
        "# Written by `imagefactory bake`; give it back with --lock to bake the same wheels.",
        f"# fleetbake-lock target={target.name}",
        f"# fleetbake-lock platform={platform}",
        f"# fleetbake-lock requirements-sha256={_sha256_text(requirements)}",
    ]
    lines = [f"{w.name}=={w.version} --hash=sha256:{w.sha256}" for w in wheels]
    return "\n".join([*header, *lines]) + "\n"


def read_lock(path: Path) -> Lock:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise die(
            f"cannot read lock file {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    fields = dict(_HEADER.findall(text))
    missing = {"target", "platform", "requirements-sha256"} - fields.keys()
    if missing:
        raise die(f"{path} is not a lock file written by `imagefactory bake` (no header)")
    return Lock(fields["target"], fields["platform"], fields["requirements-sha256"], text)


def pick_lock(locks: list[Path], target: Target) -> Lock | None:
    """The lock among `--lock` files that was written for `target`."""
    for path in locks:
        lock = read_lock(path)
        if lock.target == target.name:
            return lock
    return None


def resolve(
    requirements: str,
    target: Target,
    stages: Stages,
    lock: Lock | None = None,
    cache_dir: Path | None = None,
) -> Wheelhouse:
    """The wheelhouse of `requirements` (requirements.txt's text) for `target`, from the
    cache or downloaded now; with `lock`, exactly the wheels it pins."""
    platform = WheelPlatform.of(target)
    if lock is not None:
        _check_lock(lock, target, platform, requirements)
    pip_version = metadata.version("pip")
    inputs = {
        "recipe": WHEELS_RECIPE,
        "platform": platform.pip_args(),
        "pip": pip_version,
        "requirements": requirements if lock is None else None,
        "lock": lock.text if lock is not None else None,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    root = (cache_dir or cache_root()) / "wheels"
    entry = root / key
    if (entry / LOCK_NAME).is_file():
        return _load(entry, key, "cached")
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        what = f"{platform}" + (" from the lock file" if lock else "")
        with stages.stage("wheels", f"Python requirements for {what}"):
            source = scratch / "requirements.in"
            if lock is None:
                source.write_text(requirements)
                _download(["-r", str(source)], scratch, platform, stages)
            else:
                source.write_text(lock.text)
                _download(
                    ["--no-deps", "--require-hashes", "-r", str(source)], scratch, platform, stages
                )
            source.unlink()
            (scratch / PIP_DIR).mkdir()
            _download_pip(pip_version, scratch / PIP_DIR)
            wheels = _inventory(scratch)
            text = lock.text if lock else lock_text(target, platform, requirements, wheels)
            (scratch / LOCK_NAME).write_text(text)
        try:
            scratch.rename(entry)
        except OSError:  # a concurrent bake made the same entry: use that one
            shutil.rmtree(scratch, ignore_errors=True)
            return _load(entry, key, "cached")
        return _load(entry, key, "locked" if lock else "resolved")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _check_lock(lock: Lock, target: Target, platform: WheelPlatform, requirements: str) -> None:
    if lock.platform != str(platform):
        raise die(
            f"the lock file is for {lock.platform}, but {target.name} needs {platform}",
            hint="bake without --lock to resolve again",
        )
    if lock.requirements_sha256 != _sha256_text(requirements):
        raise die(
            "the lock file was written for another requirements.txt (it has changed since)",
            hint="bake without --lock to resolve again, and keep the new lock",
        )


def _pip(command: str, *args: str) -> None:
    """This host's pip, quiet and never asking; CommandError if it fails."""
    quiet = ["--quiet", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    run([sys.executable, "-m", "pip", command, *quiet, *args])


def _last_line(exc: CommandError) -> str:
    return (exc.tail(1) or [exc.headline()])[0]


def _download(args: list[str], dest: Path, platform: WheelPlatform, stages: Stages) -> None:
    try:
        _pip("download", "--dest", str(dest), *platform.pip_args(), *args)
    except CommandError as exc:
        missing = _NO_MATCH.search(exc.stderr)
        if missing:
            raise die(
                f"{missing[1]}: no wheel for {platform} on the package index",
                hint="pick a version with a wheel for this platform, or a pure-Python package",
            ) from None
        raise die(
            f"resolving the Python requirements for {platform} failed: {_last_line(exc)}"
        ) from None


def _download_pip(version: str, dest: Path) -> None:
    try:
        _pip("download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), f"pip=={version}")
    except CommandError as exc:
        raise die(f"cannot download pip {version} for the guest: {exc}") from None


def _inventory(directory: Path) -> list[Wheel]:
    wheels = []
    for path in sorted(directory.glob("*.whl")):
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            raise die(f"pip downloaded {path.name}, which is not a wheel") from None
        wheels.append(Wheel(canonicalize_name(name), str(version), path.name, sha256_file(path)))
    return sorted(wheels, key=lambda w: w.name)


def _load(entry: Path, key: str, source: str) -> Wheelhouse:
    pip_wheels = sorted((entry / PIP_DIR).glob("pip-*.whl"))
    if not pip_wheels:
        raise die(
            f"the wheel cache entry {entry} has no pip wheel", hint="remove it and bake again"
        )
    wheels = tuple(_inventory(entry))
    pinned = set(_PINNED_HASH.findall((entry / LOCK_NAME).read_text()))
    if pinned != {w.sha256 for w in wheels}:
        raise die(
            f"the wheels in {entry} do not match its lock file", hint="remove it and bake again"
        )
    return Wheelhouse(entry, wheels, entry / LOCK_NAME, pip_wheels[0], key, source)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def install_wheels(wheels: Wheelhouse, site: Path, target: Target) -> None:
    """The wheelhouse installed into the directory `site` by this host's pip, for the
    target's platform: offline, every file checked against its sha256 in the lock (as a VM
    image's venv gets them in the build VM). Container images and bare-metal packages."""
    try:
        _pip(
            "install", "--no-index", "--no-deps", "--require-hashes",
            "--find-links", str(wheels.dir), "--target", str(site), "--no-compile",
            *WheelPlatform.of(target).pip_args(), "-r", str(wheels.lock),
        )  # fmt: skip
    except CommandError as exc:
        raise die(f"pip cannot install the pipeline's wheels: {_last_line(exc)}") from None
    # Console scripts name this host's interpreter; tasks import the packages instead.
    shutil.rmtree(site / "bin", ignore_errors=True)
