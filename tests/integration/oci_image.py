"""Real container images for the OCI and container-node tests: `bake_oci(pipeline_dir)`
bakes once per pipeline and test process (the container base comes from the normal
cache, so only the first run on a machine builds it, with mmdebstrap, under the heavy
lock), and the pipelines the tests need beyond examples/.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from imagefactory.bake.base import BaseSpec, cache_key
from imagefactory.bake.oci import bake
from imagefactory.bake.ocibase import oci_base_inputs, oci_cache
from imagefactory.bake.options import BakeOptions, BakeResult
from imagefactory.stages import Stages
from imagefactory.targets import get_target

REPO = Path(__file__).resolve().parents[2]
EPOCH = "1700000000"
HEAVY_LOCK = Path("/tmp/fleetbake-heavy.lock")
_baked: dict[tuple[Path, str, Path], BakeResult] = {}


@contextmanager
def heavy() -> Iterator[None]:
    """One heavy job (VM, mmdebstrap) at a time on a shared machine."""
    with HEAVY_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def source_date_epoch(value: str) -> Iterator[None]:
    """SOURCE_DATE_EPOCH for one bake only: the test session's other bakes (the bare-metal
    installer's version, say) must keep the real time."""
    before = os.environ.get("SOURCE_DATE_EPOCH")
    os.environ["SOURCE_DATE_EPOCH"] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ["SOURCE_DATE_EPOCH"]
        else:
            os.environ["SOURCE_DATE_EPOCH"] = before


def base_cached(target: str) -> bool:
    spec = BaseSpec(get_target(target), mirror=os.environ.get("FLEETBAKE_MIRROR") or None)
    return oci_cache(None).lookup(cache_key(oci_base_inputs(spec, int(EPOCH)))) is not None


def bake_oci(pipeline_dir: Path, out: Path, target: str = "x86_64-linux") -> BakeResult:
    """Bake (or reuse this process's bake of) `pipeline_dir` for `target` into
    `out/PIPELINE/`; under the heavy lock only when the container base must be built."""
    key = (pipeline_dir.resolve(), target, out)
    if key not in _baked:
        # A host whose apt sources are not Debian's (the nightly Docker job) names a mirror.
        mirror = os.environ.get("FLEETBAKE_MIRROR") or None
        opts = BakeOptions(get_target(target), key[0], out / key[0].name, "oci", mirror=mirror)
        with source_date_epoch(EPOCH), heavy() if not base_cached(target) else nullcontext():
            _baked[key] = bake(opts, Stages())
    return _baked[key]


def write_pipeline(directory: Path, name: str, module: str, tasks: list[dict[str, object]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(module))
    doc = {"format": 1, "name": name, "tasks": tasks}
    (directory / "pipeline.json").write_text(json.dumps(doc))
    return directory


SLOW = """\
import time


def wait(ctx, seconds):
    time.sleep(seconds)
    return seconds
"""

PROBE = """\
import socket


def probe(ctx, targets):
    '''Try a TCP connection to each "host:port"; return what happened to each.'''
    found = {}
    for target in targets:
        host, port = target.rsplit(":", 1)
        try:
            with socket.create_connection((host, int(port)), timeout=3):
                found[target] = "connected"
        except OSError as exc:
            found[target] = type(exc).__name__
    return found
"""


NUMPY = """\
import numpy as np


def total(ctx, n):
    return {"sum": int(np.arange(n).sum()), "numpy": np.__version__}
"""


def numpy_pipeline(directory: Path) -> Path:
    """A pipeline with a requirements.txt: numpy, a wheel with a C extension."""
    write_pipeline(directory, "npsum", NUMPY, [
        {"id": "total", "call": "npsum:total", "args": {"n": 1000}},
    ])  # fmt: skip
    (directory / "requirements.txt").write_text("numpy>=1.26,<3\n")
    return directory


def slow_pipeline(directory: Path, seconds: int = 300) -> Path:
    return write_pipeline(directory, "slow", SLOW, [
        {"id": "wait", "call": "slow:wait", "args": {"seconds": seconds}, "timeout": 900},
    ])  # fmt: skip


def probe_pipeline(directory: Path, targets: list[str]) -> Path:
    return write_pipeline(directory, "probe", PROBE, [
        {"id": "probe", "call": "probe:probe", "args": {"targets": targets}},
    ])  # fmt: skip


def imagefactory(
    *args: str, state_home: Path, timeout_s: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "imagefactory"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_STATE_HOME": str(state_home)},
        check=False,
        timeout=timeout_s,
    )
