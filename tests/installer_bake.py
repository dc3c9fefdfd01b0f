"""Bake installers for tests: `bake_installer(target)` runs `bake --format installer`
on examples/etl (about a second: no VM, just dpkg-deb) into a fresh directory."""

from __future__ import annotations

from pathlib import Path

from imagefactory.bake.installer import bake
from imagefactory.bake.options import BakeOptions
from imagefactory.stages import Stages
from imagefactory.targets import get_target

REPO = Path(__file__).resolve().parents[1]
ETL = REPO / "examples" / "etl"


def bake_installer(out: Path, target: str = "x86_64-linux", pipeline: Path = ETL) -> Path:
    """OUT/TARGET-installer/, with install.sh, the .deb, manifest.json and SHA256SUMS."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "bake.log").open("w") as log:
        result = bake(BakeOptions(get_target(target), pipeline, out, "installer"), Stages(log))
    return result.dir
