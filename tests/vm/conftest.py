"""Session fixtures that bake real images, shared by the bake, boot and end-to-end tests.

`bake_image(pipeline_dir)` bakes x86_64-linux once per pipeline per test session (the
base image comes from the normal cache, so only the first session on a machine builds
it) and returns the output directory `OUT/x86_64-linux/` with the image, manifest.json
and SHA256SUMS. `baked_image` is that directory for examples/hello.

To iterate on boot tests without re-baking, point `FLEETBAKE_BAKED_DIR` at an existing
`imagefactory bake` output directory (OUT/x86_64-linux); it is used for the pipeline
whose name its manifest records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from executor.pipeline import load_pipeline
from imagefactory.bake import BakeOptions, bake
from imagefactory.stages import Stages
from imagefactory.targets import get_target

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello"
BAKE_TARGET = "x86_64-linux"


@dataclass(frozen=True)
class BakedImage:
    dir: Path
    """OUT/x86_64-linux/"""
    image: Path
    manifest: dict[str, Any]
    pipeline: Path
    """The pipeline directory it carries."""


BakeImage = Callable[[Path], BakedImage]


def _reusable(pipeline_dir: Path) -> BakedImage | None:
    given = os.environ.get("FLEETBAKE_BAKED_DIR")
    if not given:
        return None
    out = Path(given)
    manifest = json.loads((out / "manifest.json").read_text())
    if manifest["pipeline"]["name"] != load_pipeline(pipeline_dir).name:
        return None
    return BakedImage(out, out / manifest["image"]["file"], manifest, pipeline_dir)


@pytest.fixture(scope="session")
def bake_image(tmp_path_factory: pytest.TempPathFactory) -> BakeImage:
    baked: dict[Path, BakedImage] = {}

    def _bake(pipeline_dir: Path) -> BakedImage:
        pipeline_dir = pipeline_dir.resolve()
        if pipeline_dir not in baked and (reuse := _reusable(pipeline_dir)):
            baked[pipeline_dir] = reuse
        if pipeline_dir not in baked:
            out = tmp_path_factory.mktemp(f"bake-{pipeline_dir.name}")
            opts = BakeOptions(get_target(BAKE_TARGET), pipeline_dir, out)
            result = bake(opts, Stages())
            manifest = json.loads((result.dir / "manifest.json").read_text())
            baked[pipeline_dir] = BakedImage(result.dir, result.image, manifest, pipeline_dir)
        return baked[pipeline_dir]

    return _bake


@pytest.fixture(scope="session")
def baked_image(bake_image: BakeImage) -> BakedImage:
    """x86_64-linux baked with examples/hello."""
    return bake_image(HELLO)
