"""The node's Debian package, `fleetbake-node_<version>_<debarch>.deb`, built with dpkg-deb.

It carries the same files at the same places as a baked VM image (the GUEST_* paths of
bake/artifacts.py), so the executor runs the same way on a bare-metal device:

    /opt/executor/lib/...                           the executor and its dependencies
    /usr/lib/python3/dist-packages/fleetbake-executor.pth
    /usr/local/bin/executor                         the launcher
    /opt/executor/pipeline.tar.gz                   the pipeline archive
    /lib/systemd/system/executor.service            the agent's hardened unit

Its maintainer scripts (bake/debian/) make the agent's system user, and purge removes
everything the package and its installer created. It is a site-local add-on package, not
one for the Debian archive: the lintian overrides it ships say which policy tags that
layout raises and why.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath

from imagefactory.bake.artifacts import (
    GUEST_LAUNCHER,
    GUEST_LIB,
    GUEST_NODE_ENV,
    GUEST_PIPELINE,
    GUEST_PTH,
    GUEST_SITE,
    GUEST_STATE_DIR,
    GUEST_USER,
    Artifacts,
    executor_unit,
)
from imagefactory.bake.wheels import Wheelhouse, WheelPlatform, install_wheels
from imagefactory.run import run
from imagefactory.targets import Target

PACKAGE = "fleetbake-node"
PYTHON_MIN = "3.11"
UNIT_NAME = "executor.service"
DEB_UNIT = f"/lib/systemd/system/{UNIT_NAME}"
"""Where a package puts a unit (an administrator's /etc/systemd/system copy wins)."""
WANTS_LINK = f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
MAINTAINER = "fleetbake <fleetbake-node@fleetbake.invalid>"
"""No one to mail: .invalid (RFC 2606) says so, and lintian takes it as a host."""
MAINTAINER_SCRIPTS = ("postinst", "prerm", "postrm")
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")

# Tag -> why it does not apply (the package's lintian overrides). Debian's policy keeps
# packages of the Debian archive out of /opt and /usr/local; this one is a site's own
# add-on, which is what the FHS made /opt for, and it keeps the VM images' layout so a
# node runs and is operated the same way on every kind of environment.
_SITE_LOCAL = "site-local add-on package with the VM images' layout, never in the archive"
LINTIAN_OVERRIDES = {
    "dir-or-file-in-opt": _SITE_LOCAL,
    "dir-in-usr-local [usr/local/bin/]": _SITE_LOCAL,
    "file-in-usr-local [usr/local/bin/executor]": _SITE_LOCAL,
    "file-in-unusual-dir [usr/local/bin/executor]": _SITE_LOCAL,
}
_WHEELS = (
    "the pipeline's wheels, installed verbatim as pinned by sha256 in requirements.lock: "
    "their binaries are built by their projects (manylinux), not by this package"
)
_SITE_FILES = f"{GUEST_SITE.lstrip('/')}/*"
WHEEL_LINTIAN_OVERRIDES = {
    f"unstripped-binary-or-object [{_SITE_FILES}]": _WHEELS,
    f"library-not-linked-against-libc [{_SITE_FILES}]": _WHEELS,
    f"shared-library-is-executable * [{_SITE_FILES}]": _WHEELS,
    f"missing-dependency-on-libc needed by {_SITE_FILES}": _WHEELS,
}
"""Only when the package carries wheels (GUEST_SITE)."""


@dataclass(frozen=True)
class DebPackage:
    path: Path
    version: str
    debarch: str
    sha256: str
    size: int
    depends: str
    python_below: str | None
    """With wheels inside: the Python minor version they stop fitting (`3.12` for cp311)."""


def deb_name(version: str, debarch: str) -> str:
    return f"{PACKAGE}_{version}_{debarch}.deb"


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace each `@NAME@` by its value (templates are shell: `$` stays the shell's)."""
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    left = sorted(set(_PLACEHOLDER.findall(text)))
    if left:
        raise AssertionError(f"template placeholders without a value: {left}")
    return text


def _script_values() -> dict[str, str]:
    return {
        "USER": GUEST_USER,
        "STATE_DIR": GUEST_STATE_DIR,
        "LIB": GUEST_LIB,
        "SITE": GUEST_SITE,
        "UNIT": UNIT_NAME,
        "WANTS_LINK": WANTS_LINK,
        "NODE_ENV": GUEST_NODE_ENV,
        "CONFIG_DIR": str(PurePosixPath(GUEST_NODE_ENV).parent),
    }


def depends(debian_packages: tuple[str, ...] = (), python_below: str | None = None) -> str:
    """The package's Depends: what the executor needs (a Python its wheels were built for,
    if it carries any), then the pipeline's own `debian_packages` (pipeline.json)."""
    python = [f"python3 (>= {PYTHON_MIN})"] + (
        [f"python3 (<< {python_below})"] if python_below else []
    )
    return ", ".join([*python, "systemd", *debian_packages])


def python_below(wheels: Wheelhouse | None, target: Target) -> str | None:
    """cp311 wheels hold extensions for CPython 3.11 only: the package needs a Python below 3.12."""
    if wheels is None:
        return None
    major, minor = WheelPlatform.of(target).python.split(".")
    return f"{major}.{int(minor) + 1}"


def control(version: str, debarch: str, installed_kib: int, pipeline: str, depends: str) -> str:
    return (
        f"Package: {PACKAGE}\n"
        f"Version: {version}\n"
        f"Architecture: {debarch}\n"
        f"Maintainer: {MAINTAINER}\n"
        f"Installed-Size: {installed_kib}\n"
        f"Depends: {depends}\n"
        "Section: admin\n"
        "Priority: optional\n"
        f"Description: fleetbake node: the executor agent and the {pipeline} pipeline\n"
        " Runs the fleetbake executor agent as the systemd service executor.service,\n"
        f" which runs the pipeline {pipeline} once and reports its results to the\n"
        " core services named in /etc/executor/node.env.\n"
    )


def _copyright(year: int) -> str:
    return (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        f"Upstream-Name: {PACKAGE}\n\n"
        "Files: *\n"
        f"Copyright: {year} the fleetbake authors\n"
        "License: Apache-2.0\n"
        " On Debian systems, the full text of the Apache License, Version 2.0 can be\n"
        " found in /usr/share/common-licenses/Apache-2.0.\n"
    )


def _changelog(version: str, date: str) -> str:
    return (
        f"{PACKAGE} ({version}) unstable; urgency=medium\n\n"
        "  * Baked by imagefactory.\n\n"
        f" -- {MAINTAINER}  {date}\n"
    )


def _put(root: Path, guest_path: str, data: bytes, mode: int = 0o644) -> Path:
    path = root / guest_path.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _unpack_library(archive: Path, dest: Path) -> None:
    """The executor library tarball (built by us: plain files and directories only)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")


def _normalise_modes(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_dir():
            path.chmod(0o755)
        elif not path.stat().st_mode & 0o100:
            path.chmod(0o644)


def _md5sums(root: Path) -> str:
    lines = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "DEBIAN" not in p.parts):
        digest = hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()
        lines.append(f"{digest}  {path.relative_to(root)}\n")
    return "".join(lines)


def _installed_kib(root: Path) -> int:
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    return max(1, (total + 1023) // 1024)


def _gzip_n(data: bytes) -> bytes:
    """gzip -9n: no name and no time in the header, so the package is reproducible."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def build_deb(
    arts: Artifacts,
    target: Target,
    version: str,
    created: datetime.datetime,
    out_dir: Path,
    debian_packages: tuple[str, ...] = (),
    wheels: Wheelhouse | None = None,
) -> DebPackage:
    """Stage the package tree under out_dir and build the .deb next to it; every file
    dated `created` (the executor bundle's files are dated 1970 for reproducibility,
    which lintian rejects). The pipeline's wheels, if any, are installed into GUEST_SITE
    for the target's platform, so the device needs no package index either."""
    root = out_dir / "deb-root"
    if root.exists():
        shutil.rmtree(root)
    _unpack_library(arts.dir / "executor-lib.tar.gz", root / GUEST_LIB.lstrip("/"))
    paths = [GUEST_LIB]
    if wheels is not None:
        install_wheels(wheels, root / GUEST_SITE.lstrip("/"), target)
        paths.append(GUEST_SITE)
    _put(root, GUEST_PTH, "".join(f"{path}\n" for path in paths).encode())
    _put(root, GUEST_LAUNCHER, (arts.dir / "executor").read_bytes(), 0o755)
    _put(root, GUEST_PIPELINE, (arts.dir / "pipeline.tar.gz").read_bytes())
    unit = executor_unit(arts.pipeline_sha256, cloud_init=False)
    _put(root, DEB_UNIT, unit.encode())
    doc = f"/usr/share/doc/{PACKAGE}"
    _put(root, f"{doc}/copyright", _copyright(created.year).encode())
    _put(
        root,
        f"{doc}/changelog.gz",
        _gzip_n(_changelog(version, created.strftime("%a, %d %b %Y %H:%M:%S +0000")).encode()),
    )
    tags = {**LINTIAN_OVERRIDES, **(WHEEL_LINTIAN_OVERRIDES if wheels is not None else {})}
    overrides = "".join(f"# {why}\n{PACKAGE}: {tag}\n" for tag, why in tags.items())
    _put(root, f"/usr/share/lintian/overrides/{PACKAGE}", overrides.encode())
    _normalise_modes(root)
    meta = root / "DEBIAN"
    meta.mkdir(mode=0o755)
    (meta / "md5sums").write_text(_md5sums(root))
    templates = resources.files("imagefactory.bake") / "debian"
    for name in MAINTAINER_SCRIPTS:
        text = substitute(templates.joinpath(name).read_text(encoding="utf-8"), _script_values())
        _put(meta, name, text.encode(), 0o755)
    below = python_below(wheels, target)
    requires = depends(debian_packages, below)
    (meta / "control").write_text(
        control(version, target.debian_arch, _installed_kib(root), arts.pipeline_name, requires)
    )
    for path in meta.iterdir():
        if path.name not in MAINTAINER_SCRIPTS:
            path.chmod(0o644)
    epoch = int(created.timestamp())
    for path in [root, *root.rglob("*")]:
        os.utime(path, (epoch, epoch))
    deb = out_dir / deb_name(version, target.debian_arch)
    # --root-owner-group: every file root's, whoever builds; -Zxz: what Debian uses.
    run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
        env={**os.environ, "SOURCE_DATE_EPOCH": str(epoch)},
    )
    shutil.rmtree(root)
    data = deb.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    return DebPackage(deb, version, target.debian_arch, sha, len(data), requires, below)
