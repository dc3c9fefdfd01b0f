"""Fresh Python interpreters that import this executor: the services process and the
import check start one (not a fork), whatever the caller's sys.path was."""

from __future__ import annotations

import os
from pathlib import Path


def child_env() -> dict[str, str]:
    """This process's environment, with the executor package importable in a child."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
