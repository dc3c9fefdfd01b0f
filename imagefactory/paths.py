"""Where imagefactory keeps files on the host, following the XDG base directories."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$IMAGEFACTORY_CACHE`, else `$XDG_CACHE_HOME/imagefactory`, else `~/.cache/imagefactory`.

    Rebuildable data: base images, the accelerator probe's answer."""
    if env := os.environ.get("IMAGEFACTORY_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "imagefactory"


def state_root() -> Path:
    """`$XDG_STATE_HOME/imagefactory`, else `~/.local/state/imagefactory`.

    Data to keep: the server's database and secrets, booted nodes' directories."""
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "imagefactory"
