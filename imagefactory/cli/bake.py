"""`imagefactory bake` and `imagefactory render`."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from imagefactory.errors import die
from imagefactory.stages import Stages
from imagefactory.targets import TARGETS, Target, get_target, target_names

if TYPE_CHECKING:
    from imagefactory.bake.options import BakeOptions, BakeResult


def check_disk_size(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """`8G`, `8192M`, `4096`: what Packer and qemu-img accept."""
    if value is not None and not re.fullmatch(r"[1-9][0-9]*[KMGT]?", value):
        raise click.BadParameter(f"{value!r} is not a size like 8G or 8192M")
    return value


# --format -> "module:function" of its baker, `bake(BakeOptions, Stages) -> BakeResult`.
FORMATS = {
    "qcow2": "imagefactory.bake.vm:bake",
    "raw": "imagefactory.bake.vm:bake",
    "oci": "imagefactory.bake.oci:bake",
    "installer": "imagefactory.bake.installer:bake",
}


def load_baker(image_format: str) -> Callable[[BakeOptions, Stages], BakeResult]:
    module_name, attr = FORMATS[image_format].split(":")
    baker: Callable[[BakeOptions, Stages], BakeResult] = getattr(
        importlib.import_module(module_name), attr
    )
    return baker


def resolve_targets(name: str) -> list[Target]:
    """`all` means every target this host can build; otherwise one table row."""
    if name == "all":
        from imagefactory.host.doctor import can_build

        found = [t for t in TARGETS if can_build(t)]
        if not found:
            raise die("this host can build no target", hint="run `imagefactory doctor`")
        return found
    if name not in target_names():
        raise die(
            f"unknown target {name!r}", hint=f"valid targets: {', '.join(target_names())}, all"
        )
    return [get_target(name)]


@click.command("bake")
@click.option(
    "--target",
    "-t",
    "target_name",
    required=True,
    help=f"Target ({', '.join(target_names())}), or `all` this host can build.",
)
@click.option(
    "--pipeline",
    "-p",
    required=True,
    type=click.Path(path_type=Path),
    help="Pipeline directory (with pipeline.json) or a packed .tar.gz.",
)
@click.option(
    "--output",
    "-o",
    default=Path("images"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The image goes to OUTPUT/TARGET/.",
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(list(FORMATS)),
    default="qcow2",
    show_default=True,
    help="What to make: a VM image (qcow2 is compressed, raw is not), or a container "
    "image (oci: OUTPUT/TARGET-oci/, an OCI layout plus TARGET-oci.tar for docker/podman load).",
)
@click.option(
    "--disk-size",
    callback=check_disk_size,
    help="Virtual disk size, e.g. 8G (default: the target's).",
)
@click.option("--mirror", help="Debian mirror URL for the base (default: the host's apt sources).")
@click.option("--base-image", help="Use this base qcow2 (path or URL) instead of building one.")
@click.option("--base-sha256", help="sha256 of --base-image (required with it).")
@click.option(
    "--lock",
    "locks",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="requirements.lock of an earlier bake: the same Python wheels again (repeatable, "
    "one per target).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def bake_command(
    target_name: str,
    pipeline: Path,
    output: Path,
    image_format: str,
    disk_size: str | None,
    mirror: str | None,
    base_image: str | None,
    base_sha256: str | None,
    locks: tuple[Path, ...],
    as_json: bool,
) -> None:
    """Bake an environment per target that runs PIPELINE: a VM image, a container image
    or a bare-metal installer.

    qcow2/raw (a VM image): builds (or reuses from the cache) a Debian base disk,
    renders the Packer template, boots it under QEMU without network access, installs
    the executor and the pipeline, seals it, and writes OUTPUT/TARGET/{TARGET.qcow2,
    manifest.json, SHA256SUMS}.
    Progress goes to stderr, stage by stage with elapsed times.

    --format oci writes OUTPUT/TARGET-oci/ without a daemon: an OCI image layout, an
    archive for `docker load`, manifest.json and SHA256SUMS (docs/containers.md).

    --format installer boots nothing: it writes OUTPUT/TARGET-installer/ with a Debian
    package, install.sh (embeds it), manifest.json and SHA256SUMS, for bare-metal
    devices (`imagefactory install` runs it over SSH; docs/bare-metal.md).

    The pipeline's requirements.txt is resolved on this host into wheels for each
    target's platform and installed offline; its `debian_packages` go into the base
    (or the .deb's Depends). Every kind's output directory also holds sbom.cdx.json
    (CycloneDX) and, with requirements, requirements.lock: give it back with --lock to
    bake the same wheels.
    """
    from imagefactory.bake.artifacts import check_pipeline
    from imagefactory.bake.options import BakeOptions

    check_pipeline(pipeline)  # the same message as `executor validate`, before anything slow
    if base_sha256 and not base_image:
        raise die("--base-sha256 needs --base-image")
    summaries = []
    results = []
    stages = Stages()
    for target in resolve_targets(target_name):
        opts = BakeOptions(
            target, pipeline, output, image_format, disk_size, mirror, base_image, base_sha256,
            locks=locks,
        )  # fmt: skip
        result = load_baker(image_format)(opts, stages)
        results.append(result)
        image = result.manifest["image"]
        stages.say(f"==> {target.name}: {result.image} ({image['size'] / 1e6:.0f} MB)")
        summaries.append(
            {
                "target": target.name,
                "dir": str(result.dir),
                "image": str(result.image),
                "sha256": image["sha256"],
                "size": image["size"],
                "stages_s": result.manifest["stages_s"],
            }
        )
        stages = Stages()
    if image_format == "oci" and len(results) > 1:
        from imagefactory.bake.oci import write_multiarch

        index = write_multiarch(output, results)
        stages.say(f"==> all targets: {index} (one OCI index, {len(results)} platforms)")
    if as_json:
        click.echo(json.dumps({"images": summaries}, indent=2))


@click.command("render")
@click.option(
    "--target",
    "-t",
    "target_name",
    required=True,
    help=f"Target to render ({', '.join(target_names())}) or `all`.",
)
@click.option(
    "--output",
    "-o",
    default=Path("build"),
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Writes OUTPUT/TARGET/packer/*.pkr.hcl, plus the seed and key.",
)
@click.option(
    "--packer-version", help="Render for this Packer version (default: the installed one)."
)
def render_command(target_name: str, output: Path, packer_version: str | None) -> None:
    """Write the Packer HCL2 build of a target, ready for `packer validate`/`packer build`.

    The base image named in it is the target's cached base (its checksum is `none` until
    a bake has built it). Packer 1.7 and later also get `required_plugins`: run
    `packer init` there once before building.
    """
    from imagefactory.bake import packer
    from imagefactory.bake.base import BaseSpec, base_inputs, cache_key
    from imagefactory.bake.cache import BaseCache
    from imagefactory.bake.render import RenderConfig, render
    from imagefactory.host.accel import pick_accelerator
    from imagefactory.host.firmware import find_uefi

    try:
        version = packer.parse_version(packer_version or "") if packer_version else None
    except ValueError:
        raise die(f"bad --packer-version {packer_version!r}", hint="e.g. 1.6.6") from None
    version = version or packer.packer_version()
    cache = BaseCache()
    for target in resolve_targets(target_name):
        key = cache_key(base_inputs(BaseSpec(target)))
        entry = cache.lookup(key)
        image = entry.image if entry else cache.dir / key / "base.qcow2"
        cfg = RenderConfig(
            target,
            image,
            entry.sha256 if entry else "",
            (output / target.name).resolve(),
            pick_accelerator(target),
            find_uefi(target.arch),
        )
        click.echo(render(cfg, version))
