"""`imagefactory bake --format installer`: a bare-metal installer instead of a VM image.

    build_artifacts ─► build_deb (dpkg-deb) ─► install.sh (embeds the .deb) ─► lintian-free
      manifest.json + SHA256SUMS ─► publish OUTPUT/TARGET-installer/ (atomic rename)

install.sh (template: bake/installer.sh) is one POSIX sh file that carries the package
base64-encoded in a here-document and checks its sha256 before dpkg sees it. Nothing
here boots a VM or needs root: the package is built with `dpkg-deb --root-owner-group`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

from imagefactory.bake.artifacts import (
    GUEST_NODE_ENV,
    GUEST_STATE_DIR,
    Artifacts,
    build_artifacts,
)
from imagefactory.bake.cache import sha256_file
from imagefactory.bake.debpkg import (
    PACKAGE,
    PYTHON_MIN,
    UNIT_NAME,
    DebPackage,
    build_deb,
    substitute,
)
from imagefactory.bake.manifest import (
    MANIFEST_FORMAT,
    SUMS_NAME,
    common_versions,
    pipeline_entry,
)
from imagefactory.bake.needs import Needs, pipeline_needs, record_needs
from imagefactory.bake.options import BakeOptions, BakeResult, publish
from imagefactory.errors import die
from imagefactory.host.doctor import require_installer
from imagefactory.run import run
from imagefactory.stages import Stages
from imagefactory.targets import Target

SCRIPT_NAME = "install.sh"
PAYLOAD_END = "FLEETBAKE_PAYLOAD_END"
PYTHON = "/usr/bin/python3"
"""The interpreter of the launcher (its #! line): the one whose version is checked."""
AGENT_VARS = (
    "EXECUTOR_MASTER_CA",
    "EXECUTOR_INSECURE",
    "EXECUTOR_WORKERS",
    "EXECUTOR_HEARTBEAT_S",
    "EXECUTOR_POWEROFF_GRACE_S",
    "EXECUTOR_PIPELINE_MAX_BYTES",
    "EXECUTOR_PIPELINE_MAX_FILES",
    "EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES",
    "EXECUTOR_IMPORT_TIMEOUT_S",
    "EXECUTOR_FASTPATHS",
)
"""Agent settings (docs/reference/environment.md) install.sh takes from its environment."""


def output_dir(output: Path, target: Target) -> Path:
    return output / f"{target.name}-installer"


def package_version(executor_version: str, when: datetime.datetime, content: str) -> str:
    """`<executor version>+<UTC bake time>.<content>`: a later bake sorts higher, so a
    newer installer upgrades the package and the same installer finds it installed;
    `content` (a digest of the pipeline and its wheels) tells apart two bakes with the
    same time (SOURCE_DATE_EPOCH)."""
    return f"{executor_version}+{when.strftime('%Y%m%d%H%M%S')}.{content[:12]}"


def content_digest(arts: Artifacts, needs: Needs) -> str:
    """sha256 of the pipeline archive's sha256 and the wheels' lock."""
    lock = needs.wheels.lock.read_bytes() if needs.wheels else b""
    return hashlib.sha256(arts.pipeline_sha256.encode() + b"\n" + lock).hexdigest()


def bake_time() -> datetime.datetime:
    """Now, or SOURCE_DATE_EPOCH when set (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is not None:
        try:
            return datetime.datetime.fromtimestamp(int(epoch), datetime.UTC)
        except (ValueError, OverflowError):
            raise die(f"SOURCE_DATE_EPOCH={epoch!r} is not a number of seconds") from None
    return datetime.datetime.now(datetime.UTC)


def payload_function(deb: bytes) -> str:
    """`payload()` writes the package to stdout; base64 keeps the script plain text."""
    encoded = base64.encodebytes(deb).decode("ascii")
    return f"payload() {{\n  base64 -d <<'{PAYLOAD_END}'\n{encoded}{PAYLOAD_END}\n}}"


def render_script(deb: DebPackage, target: Target) -> str:
    template = resources.files("imagefactory.bake").joinpath("installer.sh")
    values = {
        "PACKAGE": PACKAGE,
        "VERSION": deb.version,
        "TARGET": target.name,
        "DEBARCH": deb.debarch,
        "DEB_NAME": deb.path.name,
        "DEB_SHA256": deb.sha256,
        "NODE_ENV": GUEST_NODE_ENV,
        "STATE_DIR": GUEST_STATE_DIR,
        "UNIT": UNIT_NAME,
        "PYTHON": PYTHON,
        "PYTHON_MIN": PYTHON_MIN,
        "PYTHON_BELOW": deb.python_below or "",
        "AGENT_VARS": " ".join(AGENT_VARS),
        # Last: the base64 text holds no `@`, but keep the template's own text checked.
        "PAYLOAD_FUNCTION": payload_function(deb.path.read_bytes()),
    }
    return substitute(template.read_text(encoding="utf-8"), values)


def build_manifest(
    target: Target,
    script: Path,
    script_sha256: str,
    deb: DebPackage,
    arts: Artifacts,
    stage_times: dict[str, float],
    created: datetime.datetime,
    debian_packages: tuple[str, ...],
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "kind": "installer",
        "target": target.name,
        "arch": target.arch,
        "created_at": created.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "image": {
            "file": script.name,
            "format": "installer",
            "sha256": script_sha256,
            "size": script.stat().st_size,
        },
        "package": {
            "name": PACKAGE,
            "file": deb.path.name,
            "version": deb.version,
            "architecture": deb.debarch,
            "sha256": deb.sha256,
            "size": deb.size,
            "depends": deb.depends,
        },
        "pipeline": pipeline_entry(arts),
        "versions": {**common_versions(arts), "dpkg_deb": _dpkg_deb_version()},
        "stages_s": dict(stage_times),
    }


def _dpkg_deb_version() -> str:
    out = run(["dpkg-deb", "--version"], check=False).stdout
    first = (out.splitlines() or ["unknown"])[0]
    return first.split("version", 1)[-1].strip().split()[0] if "version" in first else first


def write_sums(out_dir: Path, files: list[tuple[str, str]]) -> None:
    (out_dir / SUMS_NAME).write_text("".join(f"{sha}  {name}\n" for name, sha in files))


def bake(opts: BakeOptions, stages: Stages) -> BakeResult:
    target = opts.target
    started = time.monotonic()
    require_installer()
    needs = pipeline_needs(opts, stages)  # a requirement without a wheel fails here
    opts.output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-installer-", dir=opts.output))
    try:
        with stages.stage("artifacts", "executor bundle and pipeline archive"):
            arts = build_artifacts(opts.pipeline, work / "artifacts")
        result = work / "result"
        result.mkdir()
        created = bake_time()
        with stages.stage("package", f"{PACKAGE} .deb for {target.debian_arch}"):
            version = package_version(arts.executor_version, created, content_digest(arts, needs))
            deb = build_deb(
                arts, target, version, created, result, needs.debian_packages, needs.wheels
            )
        with stages.stage("script", f"{SCRIPT_NAME} with the package embedded"):
            script = result / SCRIPT_NAME
            script.write_text(render_script(deb, target), encoding="utf-8")
            script.chmod(0o755)
        with stages.stage("manifest", "manifest.json and SHA256SUMS"):
            script_sha = sha256_file(script)
            stages.times["total"] = round(time.monotonic() - started, 1)
            doc = build_manifest(
                target, script, script_sha, deb, arts, stages.times, created,
                needs.debian_packages,
            )  # fmt: skip
            record_needs(result, doc, needs, arts)
            (result / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
            write_sums(result, [(SCRIPT_NAME, script_sha), (deb.path.name, deb.sha256)])
        final = output_dir(opts.output, target)
        publish(result, final)
        return BakeResult(final, final / SCRIPT_NAME, doc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
