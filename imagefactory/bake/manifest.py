"""manifest.json and SHA256SUMS of a baked image.

The manifest records what went into the image (base inputs, versions, the pipeline and
its sha256, the guest's dpkg package list as a simple SBOM) and how long each stage
took, next to the image's own sha256 and size.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

import imagefactory
from imagefactory.bake.artifacts import GUEST_PIPELINE, Artifacts
from imagefactory.bake.base import BaseImage
from imagefactory.errors import die
from imagefactory.run import run
from imagefactory.targets import Target

MANIFEST_FORMAT = 1
SUMS_NAME = "SHA256SUMS"
REPORT_FILES = ("packages.tsv", "guest.env")
"""What provision.sh leaves for Packer to download: the dpkg list and guest versions."""


def parse_packages(tsv: str) -> list[dict[str, str]]:
    """`dpkg-query -W -f '${Package}\\t${Version}\\t${Architecture}\\n'` output."""
    rows = []
    for line in tsv.splitlines():
        parts = line.split("\t")
        if len(parts) == 3:
            rows.append({"name": parts[0], "version": parts[1], "arch": parts[2]})
    return sorted(rows, key=lambda r: r["name"])


def parse_env(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def qemu_version(binary: str) -> str:
    out = run([binary, "--version"], check=False).stdout
    return (out.splitlines() or ["unknown"])[0].removeprefix("QEMU emulator version ").strip()


def build_manifest(
    target: Target,
    image: Path,
    sha256: str,
    arts: Artifacts,
    base: BaseImage,
    accelerator: str,
    packer_version: tuple[int, ...],
    report_dir: Path,
    stage_times: dict[str, float],
) -> dict[str, Any]:
    missing = [n for n in REPORT_FILES if not (report_dir / n).is_file()]
    if missing:
        raise die(f"the build VM did not report {', '.join(missing)}")
    guest = parse_env((report_dir / "guest.env").read_text())
    return {
        "format": MANIFEST_FORMAT,
        "target": target.name,
        "arch": target.arch,
        "created_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "image": {
            "file": image.name,
            "format": image.suffix.lstrip("."),
            "sha256": sha256,
            "size": image.stat().st_size,
        },
        "pipeline": pipeline_entry(arts),
        "versions": {
            **common_versions(arts),
            "packer": ".".join(map(str, packer_version)),
            "qemu": qemu_version(target.qemu_binary),
            **{f"guest_{k}": v for k, v in sorted(guest.items())},
        },
        "base": {
            "source": base.source,
            "key": base.key,
            "sha256": base.sha256,
            "inputs": _base_summary(base.inputs),
        },  # fmt: skip
        "accelerator": accelerator,
        "stages_s": dict(stage_times),
        "packages": parse_packages((report_dir / "packages.tsv").read_text()),
    }


def pipeline_entry(arts: Artifacts) -> dict[str, str]:
    """The manifest's `pipeline`: what every kind of bake carries, and where."""
    return {"name": arts.pipeline_name, "sha256": arts.pipeline_sha256, "path": GUEST_PIPELINE}


def common_versions(arts: Artifacts) -> dict[str, str]:
    """The versions every kind of bake records; each kind adds its own tools'."""
    return {
        "imagefactory": imagefactory.__version__,
        "executor": arts.executor_version,
        "host_python": platform.python_version(),
    }


def _base_summary(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs without the verbatim guest files (their hash is the key already)."""
    return {k: v for k, v in inputs.items() if k != "files"}


def write(out_dir: Path, doc: dict[str, Any], image: Path, sha256: str) -> None:
    (out_dir / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / SUMS_NAME).write_text(f"{sha256}  {image.name}\n")
