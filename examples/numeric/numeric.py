"""A pipeline that needs a third-party package with a C extension (numpy, from
requirements.txt) and a Debian library (libgomp1, from pipeline.json)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


def sample(ctx: Any, n: int, seed: int) -> dict[str, Any]:
    """Draw `n` normal samples; the array goes to the shared store, not the results."""
    values = np.random.default_rng(seed).normal(loc=10.0, scale=2.0, size=n)
    ctx.store["samples"] = values.tobytes()
    return {"n": n, "numpy": np.__version__}


def summarize(ctx: Any) -> dict[str, float]:
    values = np.frombuffer(ctx.store["samples"], dtype=np.float64)
    return {
        "mean": round(float(values.mean()), 3),
        "std": round(float(values.std()), 3),
        "p99": round(float(np.percentile(values, 99)), 3),
    }


def openmp_threads(ctx: Any) -> int:
    """Call into the Debian package's shared library: the GNU OpenMP runtime."""
    libgomp = ctypes.CDLL("libgomp.so.1")
    return int(libgomp.omp_get_num_procs())


def report(ctx: Any) -> dict[str, Any]:
    stats = ctx.upstream["summarize"]
    ctx.log.info(
        "mean %.3f std %.3f on %d processors", stats["mean"], stats["std"], ctx.upstream["openmp"]
    )
    return {"summary": stats, "processors": ctx.upstream["openmp"]}
