"""`imagefactory bake`, as a script of steps:

    check_host ─► build_artifacts (validates the pipeline first) ─► base (cached) ─► render
      ─► packer build ─► compress ─► manifest + SHA256SUMS ─► publish (atomic rename)

Everything happens in a scratch directory next to the output (same filesystem), which
becomes OUTPUT/TARGET only when every step has succeeded. An interruption or failure
kills the build VM (via Packer's process group) and removes the scratch directory;
only Packer's log is kept, as OUTPUT/TARGET.packer.log, when the build failed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from imagefactory.bake import manifest, packer
from imagefactory.bake.artifacts import VENV_PYTHON, build_artifacts
from imagefactory.bake.base import BaseSpec, build_base, given_base
from imagefactory.bake.cache import BaseCache, sha256_file
from imagefactory.bake.needs import pipeline_needs, record_needs
from imagefactory.bake.options import BakeOptions, BakeResult, publish
from imagefactory.bake.render import RenderConfig, render
from imagefactory.host.accel import pick_accelerator
from imagefactory.host.doctor import require
from imagefactory.host.firmware import find_uefi
from imagefactory.run import run
from imagefactory.stages import Stages


def compress_argv(source: Path, dest: Path, image_format: str) -> list[str]:
    """qcow2 output is compressed with zstd (QEMU >= 5.1 reads it; faster and smaller
    than zlib), dropping zeros and unused clusters; raw is sparse."""
    compress = ["-c", "-o", "compression_type=zstd"] if image_format == "qcow2" else []
    return ["qemu-img", "convert", *compress, "-O", image_format, str(source), str(dest)]


def bake(opts: BakeOptions, stages: Stages) -> BakeResult:
    target = opts.target
    started = time.monotonic()
    require(target)
    opts.output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-build-", dir=opts.output))
    # Outside the scratch directory, so that it survives a failed build.
    packer_log = opts.output / f"{target.name}.packer.log"
    packer_log.unlink(missing_ok=True)
    try:
        needs = pipeline_needs(opts, stages)  # a requirement without a wheel fails here
        with stages.stage("artifacts", "executor bundle and pipeline archive"):
            arts = build_artifacts(opts.pipeline, work / "artifacts", VENV_PYTHON, needs.wheels)
        cache = BaseCache(opts.cache_dir)
        if opts.base_image:
            base = given_base(opts.base_image, opts.base_sha256, cache, stages)
        else:
            spec = BaseSpec(target, mirror=opts.mirror, extra_packages=needs.debian_packages)
            base = build_base(spec, cache, stages)
        accel = pick_accelerator(target)
        cfg = RenderConfig(
            target, base.image, base.sha256, work, accel, find_uefi(target.arch),
            image_format=opts.image_format, disk_size=opts.disk_size,
        )  # fmt: skip
        version = packer.packer_version()
        hcl = render(cfg, version)
        packer.build(hcl, packer_log, stages)
        result = work / "result"
        result.mkdir()
        image = result / cfg.vm_name
        with stages.stage("compress", f"{opts.image_format} image"):
            run(compress_argv(cfg.output_directory / cfg.vm_name, image, opts.image_format))
            shutil.rmtree(cfg.output_directory)
        with stages.stage("manifest", "manifest.json and SHA256SUMS"):
            sha = sha256_file(image)
            stages.times["total"] = round(time.monotonic() - started, 1)
            doc = manifest.build_manifest(
                target, image, sha, arts, base, accel, version, work / "report", stages.times
            )
            record_needs(result, doc, needs, arts)
            manifest.write(result, doc, image, sha)
        (result / "logs").mkdir()
        shutil.move(packer_log, result / "logs" / "packer.log")
        if cfg.console_log.exists():
            shutil.move(cfg.console_log, result / "logs" / "console.log")
        final = opts.output / target.name
        publish(result, final)
        return BakeResult(final, final / image.name, doc)
    finally:
        shutil.rmtree(work, ignore_errors=True)
