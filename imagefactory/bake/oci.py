"""`imagefactory bake --format oci`: a container image of a target, without a daemon.

    check_host ─► build_artifacts ─► container base layer (cached, bake/ocibase.py)
      ─► executor layer (launcher, library, pipeline) ─► OCI layout (config, manifest,
         index.json) ─► skopeo: T-oci.tar (docker-archive) ─► manifest.json + SHA256SUMS
      ─► publish OUTPUT/T-oci (atomic rename)

The image runs the same executor layout as the VM image (the GUEST_* paths of
bake/artifacts.py). Its entrypoint is `tini -- executor agent`: tini is PID 1, reaps
orphans and passes SIGTERM to the agent, which cancels the run and still delivers its
report. The agent's state directory is a volume, so a run without a master leaves its
results and combined log there. Both layers and every JSON document are deterministic,
so the same inputs and SOURCE_DATE_EPOCH give the same manifest digest.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Any

import imagefactory
from imagefactory.bake.artifacts import (
    GUEST_LAUNCHER,
    GUEST_LIB,
    GUEST_PIPELINE,
    GUEST_PTH,
    GUEST_SITE,
    GUEST_STATE_DIR,
    Artifacts,
    build_artifacts,
)
from imagefactory.bake.base import BaseSpec
from imagefactory.bake.cache import sha256_file
from imagefactory.bake.manifest import MANIFEST_FORMAT, SUMS_NAME, parse_packages
from imagefactory.bake.needs import pipeline_needs, record_needs
from imagefactory.bake.ocibase import OciBase, build_oci_base, oci_cache
from imagefactory.bake.ocilayer import Layer, source_date_epoch, write_layer
from imagefactory.bake.ocilayout import MEDIA_MANIFEST, Descriptor, ImageConfig, Layout, Platform
from imagefactory.bake.options import BakeOptions, BakeResult, publish
from imagefactory.bake.wheels import Wheelhouse, install_wheels
from imagefactory.errors import die
from imagefactory.host.doctor import require_oci
from imagefactory.run import run
from imagefactory.stages import Stages
from imagefactory.targets import Target

REF = "latest"
"""The ref name of the image in its layout's index.json (skopeo: `oci:DIR:latest`)."""
TINI = "/usr/bin/tini"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PLATFORMS = {"amd64": Platform("amd64"), "arm64": Platform("arm64", "v8")}
"""Debian architecture -> OCI platform (GOARCH spelling)."""


def output_dir(output: Path, target: Target) -> Path:
    return output / f"{target.name}-oci"


def platform_of(target: Target) -> Platform:
    try:
        return PLATFORMS[target.debian_arch]
    except KeyError:
        raise die(f"no OCI platform known for {target.debian_arch}") from None


def image_name(pipeline_name: str, target: Target) -> str:
    """`fleetbake/PIPELINE:TARGET`: what `docker load` tags the archive as."""
    repo = re.sub(r"[^a-z0-9]+", "-", pipeline_name.lower()).strip("-") or "pipeline"
    return f"fleetbake/{repo}:{target.name}"


def image_config(arts: Artifacts, target: Target, base: OciBase) -> ImageConfig:
    user = f"{base.guest['agent_uid']}:{base.guest['agent_gid']}"
    return ImageConfig(
        entrypoint=(TINI, "--", GUEST_LAUNCHER, "agent"),
        env=(
            f"PATH={PATH}",
            "LANG=C.UTF-8",
            f"HOME={GUEST_STATE_DIR}",
            f"EXECUTOR_PIPELINE={GUEST_PIPELINE}",
            f"EXECUTOR_PIPELINE_SHA256={arts.pipeline_sha256}",
            # The agent's end ends the container: nothing to power off.
            "EXECUTOR_POWEROFF_COMMAND=true",
        ),
        user=user,
        working_dir=GUEST_STATE_DIR,
        volumes=(GUEST_STATE_DIR,),
        labels=(
            ("org.opencontainers.image.title", arts.pipeline_name),
            ("io.fleetbake.target", target.name),
            ("io.fleetbake.pipeline.sha256", arts.pipeline_sha256),
            ("io.fleetbake.executor.version", arts.executor_version),
        ),
    )


def _inside(root: Path, guest_path: str) -> Path:
    return root / PurePosixPath(guest_path).relative_to("/")


def stage_executor(
    arts: Artifacts, root: Path, guest_python: str, target: Target, wheels: Wheelhouse | None
) -> bool:
    """The executor layer's tree: library, the pipeline's wheels, .pth, launcher and
    pipeline. Python files are byte-compiled (hash-checked .pyc, no times) when this
    Python is the guest's version, so the agent starts without compiling. Returns whether
    they were."""
    lib = _inside(root, GUEST_LIB)
    lib.mkdir(parents=True)
    with tarfile.open(arts.dir / "executor-lib.tar.gz") as tar:
        tar.extractall(lib, filter="data")
    paths = [lib]
    if wheels is not None:
        paths.append(_inside(root, GUEST_SITE))
        install_wheels(wheels, paths[-1], target)
    pth = _inside(root, GUEST_PTH)
    pth.parent.mkdir(parents=True)
    pth.write_text("".join(f"/{p.relative_to(root)}\n" for p in paths))
    launcher = _inside(root, GUEST_LAUNCHER)
    launcher.parent.mkdir(parents=True)
    shutil.copyfile(arts.dir / "executor", launcher)
    shutil.copyfile(arts.dir / "pipeline.tar.gz", _inside(root, GUEST_PIPELINE))
    compiled = guest_python.split(".")[:2] == [str(v) for v in sys.version_info[:2]]
    if compiled:
        run([
            sys.executable, "-m", "compileall", "-q", "-j", "0",
            "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/", *map(str, paths),
        ])  # fmt: skip
    for path in [root, *root.rglob("*")]:
        executable = path.is_dir() or path == launcher or path.parent.name == "bin"
        path.chmod(0o755 if executable else 0o644)
    return compiled


def bake(opts: BakeOptions, stages: Stages) -> BakeResult:
    target = opts.target
    if opts.base_image or opts.disk_size:
        raise die("--base-image and --disk-size are for VM images, not --format oci")
    started = time.monotonic()
    require_oci(target)
    epoch = source_date_epoch()
    opts.output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-oci-build-", dir=opts.output))
    try:
        needs = pipeline_needs(opts, stages)  # a requirement without a wheel fails here
        with stages.stage("artifacts", "executor bundle and pipeline archive"):
            arts = build_artifacts(opts.pipeline, work / "artifacts")
        spec = BaseSpec(target, mirror=opts.mirror, extra_packages=needs.debian_packages)
        base = build_oci_base(spec, epoch, oci_cache(opts.cache_dir), stages)
        with stages.stage("layer", "executor, launcher and pipeline layer"):
            python = base.guest.get("python", "")
            compiled = stage_executor(arts, work / "app", python, target, needs.wheels)
            app = write_layer(work / "app", work / "app.tar.gz", epoch, root_owned=True)
        result = work / "result"
        platform = platform_of(target)
        with stages.stage("layout", "OCI image layout"):
            layout = Layout(result)
            history = [
                f"fleetbake container base {base.key[:12]} (mmdebstrap {spec.suite})",
                f"fleetbake executor {arts.executor_version}, pipeline {arts.pipeline_name}",
            ]
            config = image_config(arts, target, base)
            desc = layout.add_image(config, platform, [base.layer, app], epoch, history)
            layout.write_index([(desc, platform, REF)])
        name = image_name(arts.pipeline_name, target)
        archive = result / f"{target.name}-oci.tar"
        with stages.stage("archive", f"skopeo: {archive.name} as {name}"):
            to_archive(result, archive, name)
        with stages.stage("manifest", "manifest.json and SHA256SUMS"):
            sha = sha256_file(archive)
            stages.times["total"] = round(time.monotonic() - started, 1)
            doc = build_manifest(target, archive, sha, arts, base, [base.layer, app], desc, name)
            doc["oci"]["bytecode"] = compiled
            doc["stages_s"] = dict(stages.times)
            record_needs(result, doc, needs, arts)
            write(result, doc, archive, sha)
        final = output_dir(opts.output, target)
        publish(result, final)
        return BakeResult(final, final / archive.name, doc)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_multiarch(output: Path, results: list[BakeResult]) -> Path:
    """OUTPUT/all-oci/: one OCI layout whose image `latest` is an image index listing
    every target's manifest with its platform, so a single name serves every
    architecture (`skopeo copy --all oci:OUTPUT/all-oci:latest docker://REGISTRY/NAME`)."""
    final = output / "all-oci"
    scratch = Path(tempfile.mkdtemp(prefix=".all-oci-", dir=output))
    try:
        layout = Layout(scratch / "layout")
        entries = []
        for result in results:
            source = result.dir / "blobs" / "sha256"
            for blob in sorted(source.iterdir()):
                if not (layout.blobs / blob.name).exists():
                    shutil.copyfile(blob, layout.blobs / blob.name)
            oci_doc = result.manifest["oci"]
            size = (source / oci_doc["manifest_digest"].removeprefix("sha256:")).stat().st_size
            desc = Descriptor(MEDIA_MANIFEST, oci_doc["manifest_digest"], size)
            entries.append((desc, Platform.from_doc(oci_doc["platform"])))
        layout.write_index([(layout.add_index(entries), None, REF)])
        publish(scratch / "layout", final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def to_archive(layout: Path, archive: Path, name: str) -> None:
    """The layout's image as an archive `docker load` and `podman load` accept. The
    policy check is off because both ends are local files this bake just wrote."""
    run([
        "skopeo", "--insecure-policy", "copy", "--quiet",
        f"oci:{layout}:{REF}", f"docker-archive:{archive}:{name}",
    ])  # fmt: skip


def build_manifest(
    target: Target,
    archive: Path,
    sha256: str,
    arts: Artifacts,
    base: OciBase,
    layers: list[Layer],
    desc: Descriptor,
    name: str,
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "kind": "oci",
        "target": target.name,
        "arch": target.arch,
        "created_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "image": {
            "file": archive.name,
            "format": "docker-archive",
            "sha256": sha256,
            "size": archive.stat().st_size,
        },
        "oci": {
            "layout": ".",
            "ref": REF,
            "name": name,
            "manifest_digest": desc.digest,
            "platform": platform_of(target).doc(),
            "source_date_epoch": source_date_epoch(),
            "layers": [
                {"content": content, "digest": la.digest, "diff_id": la.diff_id, "size": la.size}
                for content, la in zip(("base", "executor"), layers, strict=True)
            ],
            "compressed_size": sum(la.size for la in layers),
        },
        "pipeline": {
            "name": arts.pipeline_name,
            "sha256": arts.pipeline_sha256,
            "path": GUEST_PIPELINE,
        },  # fmt: skip
        "versions": {
            "imagefactory": imagefactory.__version__,
            "executor": arts.executor_version,
            "host_python": sys.version.split()[0],
            **{
                f"guest_{k}": v for k, v in sorted(base.guest.items()) if not k.startswith("agent_")
            },
        },
        "base": {
            "source": base.source,
            "key": base.key,
            "inputs": {k: v for k, v in base.inputs.items() if k != "setup"},
        },
        "packages": parse_packages(base.packages_tsv),
    }


def write(out_dir: Path, doc: dict[str, Any], archive: Path, sha256: str) -> None:
    (out_dir / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    index_sha = sha256_file(out_dir / "index.json")
    (out_dir / SUMS_NAME).write_text(f"{sha256}  {archive.name}\n{index_sha}  index.json\n")
