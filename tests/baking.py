"""Session fixtures that bake real images, shared by the bake, boot and end-to-end tests
(a plugin loaded by tests/conftest.py, so tests/vm and tests/e2e share one bake).

`bake_image(pipeline_dir, target="x86_64-linux")` bakes once per pipeline and target per
test session (the base image comes from the normal cache, so only the first session on
a machine builds it) and returns a `BakedImage`: the output directory `OUT/TARGET/` with
the image, manifest.json and SHA256SUMS. `baked_image` is x86_64-linux with examples/etl,
the one image the whole x86_64 suite boots.

To iterate on boot tests without re-baking, point `FLEETBAKE_BAKED_DIR` at an existing
`imagefactory bake` output directory (OUT/TARGET); it is used for the pipeline and
target its manifest records.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from executor.pipeline import load_pipeline
from imagefactory.bake.options import BakeOptions
from imagefactory.bake.vm import bake
from imagefactory.stages import Stages
from imagefactory.targets import get_target

REPO = Path(__file__).resolve().parents[1]
ETL = REPO / "examples" / "etl"
BAKE_TARGET = "x86_64-linux"


@dataclass(frozen=True)
class BakedImage:
    dir: Path
    """OUT/TARGET/"""
    image: Path
    manifest: dict[str, Any]
    pipeline: Path
    """The pipeline directory it carries."""


class BakeImage(Protocol):
    def __call__(self, pipeline_dir: Path, target: str = BAKE_TARGET) -> BakedImage: ...


def _reusable(pipeline_dir: Path, target: str) -> BakedImage | None:
    given = os.environ.get("FLEETBAKE_BAKED_DIR")
    if not given:
        return None
    out = Path(given)
    manifest = json.loads((out / "manifest.json").read_text())
    if (manifest["pipeline"]["name"], manifest["target"]) != (
        load_pipeline(pipeline_dir, imports="when-installed").name,
        target,
    ):
        return None
    return BakedImage(out, out / manifest["image"]["file"], manifest, pipeline_dir)


@pytest.fixture(scope="session")
def bake_image(tmp_path_factory: pytest.TempPathFactory) -> BakeImage:
    baked: dict[tuple[Path, str], BakedImage] = {}

    def _bake(pipeline_dir: Path, target: str = BAKE_TARGET) -> BakedImage:
        key = (pipeline_dir.resolve(), target)
        if key not in baked and (reuse := _reusable(*key)):
            baked[key] = reuse
        if key not in baked:
            out = tmp_path_factory.mktemp(f"bake-{key[0].name}-{target}")
            result = bake(BakeOptions(get_target(target), key[0], out), Stages())
            manifest = json.loads((result.dir / "manifest.json").read_text())
            baked[key] = BakedImage(result.dir, result.image, manifest, key[0])
        return baked[key]

    return _bake


@pytest.fixture(scope="session")
def baked_image(bake_image: BakeImage) -> BakedImage:
    """x86_64-linux baked with examples/etl."""
    return bake_image(ETL)
