"""What a pipeline needs beyond the executor, for one target's environment, and the
records of it that sit next to the environment.

    pipeline (requirements.txt, pipeline.json `debian_packages`)
      ─► Needs: the wheelhouse for the target (bake/wheels.py) + the Debian packages
      ─► after the build: requirements.lock, sbom.cdx.json, and their entries in manifest.json
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import executor
from executor.requirements import REQUIREMENTS_FILE
from imagefactory.bake.artifacts import Artifacts, check_pipeline
from imagefactory.bake.cache import sha256_file
from imagefactory.bake.options import BakeOptions
from imagefactory.bake.sbom import SBOM_NAME, PythonPackage, build_sbom
from imagefactory.bake.wheels import LOCK_NAME, Wheelhouse, pick_lock, resolve
from imagefactory.errors import die
from imagefactory.stages import Stages

BUNDLED_DISTRIBUTIONS = ("tenacity", "packaging")
"""The executor's own dependencies, copied into every environment beside it."""


@dataclass(frozen=True)
class Needs:
    debian_packages: tuple[str, ...]
    wheels: Wheelhouse | None
    """None when the pipeline declares no Python requirements."""


def pipeline_needs(opts: BakeOptions, stages: Stages) -> Needs:
    """Resolve the pipeline's declared needs for `opts.target`. Runs before any VM or
    container build, so a requirement without a wheel for the target fails the bake at
    once, naming the package and the platform."""
    pipeline = check_pipeline(opts.pipeline)
    lock = pick_lock(list(opts.locks), opts.target) if opts.locks else None
    if opts.locks and lock is None:
        raise die(
            f"none of the --lock files is for {opts.target.name}",
            hint=f"give the {LOCK_NAME} written next to an earlier {opts.target.name} bake",
        )
    if not pipeline.requirements:
        if lock is not None:
            raise die(f"--lock was given, but the pipeline declares no {REQUIREMENTS_FILE}")
        return Needs(pipeline.debian_packages, None)
    requirements = (pipeline.root / REQUIREMENTS_FILE).read_text()
    wheels = resolve(requirements, opts.target, stages, lock, opts.cache_dir)
    return Needs(pipeline.debian_packages, wheels)


def python_packages(needs: Needs) -> list[PythonPackage]:
    """The executor's environment: its own bundle, then the pipeline's wheels."""
    bundled = [PythonPackage("executor", executor.__version__)]
    bundled += [PythonPackage(n, metadata.version(n)) for n in BUNDLED_DISTRIBUTIONS]
    wheels = needs.wheels.wheels if needs.wheels else ()
    return bundled + [PythonPackage(w.name, w.version, w.sha256) for w in wheels]


def record_needs(out_dir: Path, doc: dict[str, Any], needs: Needs, arts: Artifacts) -> None:
    """Write requirements.lock (when there are wheels) and the SBOM into `out_dir`, and
    link both from the manifest `doc`. The SBOM's Debian packages are the environment's
    `packages` in `doc` (none for a bare-metal package: those are the device's)."""
    packages = python_packages(needs)
    doc["python_packages"] = [
        {"name": p.name, "version": p.version, "sha256": p.sha256} for p in packages
    ]
    doc["debian_packages_declared"] = list(needs.debian_packages)
    if needs.wheels is not None:
        shutil.copyfile(needs.wheels.lock, out_dir / LOCK_NAME)
        doc["requirements_lock"] = {"file": LOCK_NAME, "source": needs.wheels.source}
    environment = f"{doc['target']} {doc['image']['format']}"
    sbom = build_sbom(
        environment, arts.pipeline_name, arts.pipeline_sha256, doc.get("packages", []), packages
    )
    (out_dir / SBOM_NAME).write_text(sbom)
    doc["sbom"] = {
        "file": SBOM_NAME,
        "format": "CycloneDX 1.5",
        "sha256": sha256_file(out_dir / SBOM_NAME),
    }
