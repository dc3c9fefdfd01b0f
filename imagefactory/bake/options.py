"""What every kind of bake takes and gives back, and how it publishes its output.

Each format's baker is `bake(opts, stages) -> BakeResult` (the VM kind: bake/vm.py); the
CLI picks it from FORMATS in cli/bake.py.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.targets import Target


@dataclass(frozen=True)
class BakeOptions:
    target: Target
    pipeline: Path
    output: Path
    """The image goes to `output/<target>/`."""
    image_format: str = "qcow2"
    """qcow2 (compressed) or raw for VM images; or another kind's format."""
    disk_size: str | None = None
    """Virtual disk size; None: the target's default."""
    mirror: str | None = None
    """Debian mirror for the base; None: the host's apt sources."""
    base_image: str | None = None
    """Path or URL of a ready base qcow2 (e.g. Debian genericcloud) instead of building one."""
    base_sha256: str | None = None
    """Required with base_image."""
    cache_dir: Path | None = None
    """Base image cache root; None: the default (see paths.cache_root)."""
    locks: tuple[Path, ...] = ()
    """requirements.lock files of earlier bakes (bake/wheels.py): each target whose lock
    is among them gets exactly the wheels it pins."""


@dataclass(frozen=True)
class BakeResult:
    dir: Path
    image: Path
    manifest: dict[str, Any]


def publish(scratch: Path, final: Path) -> None:
    """Replace `final` by `scratch` with renames only, so readers never see a mix."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{time.time_ns()}")
        final.rename(old)
    scratch.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
