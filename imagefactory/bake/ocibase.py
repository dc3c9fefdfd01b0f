"""The container base: Debian with Python and what the executor needs, as one cached
OCI layer.

    BaseSpec ──► oci_base_inputs() ──► cache key ──(hit)──► cached layer.tar.gz
                                          └─(miss)─► mmdebstrap (minbase) ─► setup script
                                                     ─► ocilayer.write_layer ─► cache entry

It is the VM base's sibling, built from the same target row, suite, mirrors and dpkg
options, without kernel, bootloader, systemd or cloud-init: a container runtime boots
nothing, and `tini` is PID 1. The entry is content-addressed like the VM base (own
directory, `oci-base/`), and holds the compressed layer, its uncompressed digest (the
image config's diff_id) and the dpkg list and versions for the manifest.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imagefactory.bake.base import (
    DPKG_OPTIONS,
    BaseSpec,
    cache_key,
    host_sources,
    mirror_args,
    run_mmdebstrap,
    write_overlay,
)
from imagefactory.bake.cache import BaseCache, Entry
from imagefactory.bake.manifest import parse_env
from imagefactory.bake.ocilayer import Layer, write_layer
from imagefactory.stages import Stages

OCI_BASE_RECIPE = 1
"""Bump when the build steps change in a way the other inputs do not show."""
CACHE_KIND = "oci-base"
LAYER_NAME = "layer.tar.gz"
LAYER_INFO_NAME = "layer.json"
"""The layer's digests and the guest facts (dpkg list, versions) for the manifest."""

OCI_PACKAGES = ("python3", "tini", "ca-certificates")
"""python3 runs the executor; tini is PID 1 (reaps orphans, passes SIGTERM on);
ca-certificates lets the agent reach an https master."""

AGENT_USER = "executor"
AGENT_HOME = "/var/lib/executor"
OUT_DIR = "/fleetbake-out"
"""Where the setup script leaves the guest facts; moved out before the layer is written."""

SETUP_SCRIPT = f"""\
set -eu
# The agent and its tasks run as this unprivileged system user; its home is the state
# directory, a volume of the container.
useradd --system --user-group --no-create-home --home-dir {AGENT_HOME} \\
  --shell /usr/sbin/nologin --comment "fleetbake executor agent" {AGENT_USER}
install -d -m 0700 -o {AGENT_USER} -g {AGENT_USER} {AGENT_HOME}
mkdir -p {OUT_DIR}
dpkg-query -W -f '${{Package}}\\t${{Version}}\\t${{Architecture}}\\n' > {OUT_DIR}/packages.tsv
{{
  echo "python=$(python3 -c 'import platform; print(platform.python_version())')"
  echo "debian=$(cat /etc/debian_version)"
  echo "agent_uid=$(id -u {AGENT_USER})"
  echo "agent_gid=$(id -g {AGENT_USER})"
}} > {OUT_DIR}/guest.env
# A container never runs apt from its own image: no lists, caches or logs in the layer.
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/ldconfig/aux-cache \\
  /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/*
: > /etc/machine-id
rm -f /fleetbake-setup.sh
"""


@dataclass(frozen=True)
class OciBase:
    """A cached container base layer and the facts recorded with it."""

    layer: Layer
    key: str
    inputs: dict[str, Any]
    source: str
    """`built` or `cached`."""
    packages_tsv: str
    guest: dict[str, str]


def oci_packages(spec: BaseSpec) -> tuple[str, ...]:
    """The container base's packages, then the pipeline's `debian_packages`."""
    return tuple(dict.fromkeys((*OCI_PACKAGES, *spec.extra_packages)))


def oci_cache(root: Path | None) -> BaseCache:
    return BaseCache(root, CACHE_KIND, LAYER_NAME, (LAYER_INFO_NAME,))


def oci_base_inputs(spec: BaseSpec, epoch: int) -> dict[str, Any]:
    """Everything the base layer depends on (the cache key is their sha256)."""
    mirrors = [spec.mirror] if spec.mirror else [p.read_text() for p in host_sources()]
    return {
        "recipe": OCI_BASE_RECIPE,
        "kind": "oci",
        "suite": spec.suite,
        "arch": spec.target.debian_arch,
        "packages": sorted(oci_packages(spec)),
        "dpkg_options": list(DPKG_OPTIONS),
        "mirrors": mirrors,
        "setup": SETUP_SCRIPT,
        "source_date_epoch": epoch,
    }


def mmdebstrap_argv(spec: BaseSpec, rootfs: Path, overlay: Path, mirrors: list[str]) -> list[str]:
    return [
        "mmdebstrap",
        "--mode=root",
        "--variant=minbase",
        f"--arch={spec.target.debian_arch}",
        "--format=directory",
        f"--include={','.join(oci_packages(spec))}",
        *(f"--dpkgopt={opt}" for opt in DPKG_OPTIONS),
        f"--customize-hook=sync-in {overlay} /",
        '--customize-hook=chroot "$1" /bin/sh /fleetbake-setup.sh',
        spec.suite,
        str(rootfs),
        *mirrors,
    ]


def _from_entry(entry: Entry, source: str) -> OciBase:
    info = json.loads((entry.path / LAYER_INFO_NAME).read_text())
    layer = Layer(
        entry.image, f"sha256:{entry.sha256}", info["diff_id"], entry.image.stat().st_size
    )
    return OciBase(layer, entry.key, entry.inputs, source, info["packages_tsv"], info["guest"])


def build_oci_base(spec: BaseSpec, epoch: int, cache: BaseCache, stages: Stages) -> OciBase:
    """Return the cached container base layer for `spec`, building it first if needed."""
    inputs = oci_base_inputs(spec, epoch)
    key = cache_key(inputs)
    if entry := cache.lookup(key):
        stages.say(f"==> base: reusing cached container base {key[:12]} ({entry.image})")
        return _from_entry(entry, "cached")
    with cache.building(key, inputs) as work:
        rootfs, overlay = work / "rootfs", work / "overlay"
        write_overlay(overlay, {"/fleetbake-setup.sh": SETUP_SCRIPT})
        log_path = work.parent / f"{key[:12]}-mmdebstrap.log"
        argv = mmdebstrap_argv(spec, rootfs, overlay, mirror_args(spec))
        env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
        run_mmdebstrap(argv, spec, work, log_path, stages, env)
        facts = rootfs / OUT_DIR.lstrip("/")
        info = {
            "packages_tsv": (facts / "packages.tsv").read_text(),
            "guest": parse_env((facts / "guest.env").read_text()),
        }
        shutil.rmtree(facts)
        with stages.stage("layer", "container base layer (sorted, clamped times, gzip)"):
            layer = write_layer(rootfs, work / LAYER_NAME, epoch)
        (work / LAYER_INFO_NAME).write_text(json.dumps({**info, "diff_id": layer.diff_id}))
        shutil.rmtree(rootfs)
        log_path.unlink(missing_ok=True)
    built = cache.lookup(key)
    assert built is not None
    return _from_entry(built, "built")
