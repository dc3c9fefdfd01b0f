"""The arm64 base build against the amd64 one: both built cold, one after the other.

Each round builds the base of every target with `imagefactory bake`'s own code
(`bake.base.build_base`: mmdebstrap, then the disk) into an empty cache of its own, so
nothing is reused between builds, and the targets take turns in every round. Prints the
median seconds per target (the `rootfs` and `disk` stages and their total) and the ratio
of each target's total to the first target's.

    .venv/bin/python benchmarks/base_build.py                     # amd64 then arm64, once
    .venv/bin/python benchmarks/base_build.py --rounds 3 --json out.json
    flock /tmp/fleetbake-heavy.lock .venv/bin/python benchmarks/base_build.py

Goal (issue 18): the arm64 base at most 5x the amd64 one. It downloads the packages
from the host's Debian apt sources (or --mirror) in every build, and runs as root.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from imagefactory.bake.base import BASE_RECIPE, BaseSpec, build_base
from imagefactory.bake.cache import BaseCache
from imagefactory.stages import Stages
from imagefactory.targets import get_target, target_names


def build_once(target_name: str, mirror: str | None, scratch: Path) -> dict[str, float]:
    """One cold build: seconds of its stages and in all."""
    stages = Stages(out=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-base-", dir=scratch) as tmp:
        started = time.monotonic()
        build_base(BaseSpec(get_target(target_name), mirror=mirror), BaseCache(Path(tmp)), stages)
        total = time.monotonic() - started
    return {**stages.times, "total": round(total, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--targets", default="x86_64-linux,aarch64-linux",
        help="comma-separated targets; ratios are against the first (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="builds per target")
    parser.add_argument("--mirror", help="Debian mirror URL (default: the host's apt sources)")
    parser.add_argument("--scratch", type=Path, default=None, help="where the builds happen")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in target_names()]
    if unknown or args.rounds < 1:
        raise SystemExit(f"Error: unknown target {unknown} or --rounds below 1")
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
    for round_ in range(args.rounds):
        for target in targets:
            print(f"==> round {round_ + 1}: {target}", file=sys.stderr, flush=True)
            runs[target].append(build_once(target, args.mirror, args.scratch or Path("/var/tmp")))
    medians = {t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()}
    first = medians[targets[0]]["total"]
    figures: dict[str, Any] = {
        "recipe": BASE_RECIPE,
        "rounds": args.rounds,
        "median_s": medians,
        "runs": runs,
        "ratio_to_first": {t: m["total"] / first for t, m in medians.items()},
    }
    for target, m in medians.items():
        stages = "  ".join(f"{k} {v:6.1f}" for k, v in m.items() if k != "total")
        ratio = figures["ratio_to_first"][target]
        print(f"{target:14} total {m['total']:6.1f} s  ({stages})  {ratio:4.2f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
