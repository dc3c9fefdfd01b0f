"""runc as the container runtime of a node: no daemon, one `runc run` per container.

    OCI layout ──umoci unpack (once per manifest digest)──► shared rootfs + base config.json
    base config.json + node ──runtime_spec()──► the node's bundle/config.json
    `runc run` (foreground: its exit is the container's) ─► console.log

The unpacked root filesystem is shared by every container of that image and mounted
read-only (the image is never modified, as a VM's qcow2 backing file is); a container
writes only its tmpfs /tmp and /run and its own state directory, bind-mounted at the
agent's state directory. The process runs as the image's unprivileged user, without
capabilities and with no_new_privs, in the node's own network namespace (boot/netns.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executor.settings import SYSTEM_STATE_DIR
from imagefactory.errors import die
from imagefactory.paths import cache_root, state_root
from imagefactory.run import CommandError, run, spawn

REF = "latest"
CAPABILITY_SETS = ("bounding", "effective", "inheritable", "permitted", "ambient")
STOP_GRACE_S = 30.0
"""SIGTERM to SIGKILL: time for the agent to cancel the run and deliver its report."""


@dataclass(frozen=True)
class ContainerSpec:
    """What makes one container of an image one node."""

    name: str
    rootfs: Path
    hostname: str
    env: tuple[tuple[str, str], ...]
    """The node's variables (node.env's), over the image's own."""
    state_dir: Path
    """Host directory mounted at the agent's state directory."""
    netns: Path


def runc_root() -> Path:
    """runc's own state directory for the containers of this user's nodes."""
    return state_root() / "runc"


def runc_argv(*args: str) -> list[str]:
    return ["runc", "--root", str(runc_root()), *args]


def manifest_digest(layout: Path) -> str:
    """The digest of the image named `latest` in the layout's index.json."""
    try:
        index = json.loads((layout / "index.json").read_text(encoding="utf-8"))
        manifests = index["manifests"]
    except (OSError, ValueError, KeyError, TypeError):
        raise die(f"{layout} is not an OCI image layout (no readable index.json)") from None
    for entry in manifests:
        ref = entry.get("annotations", {}).get("org.opencontainers.image.ref.name")
        if ref == REF and str(entry.get("digest", "")).startswith("sha256:"):
            return str(entry["digest"])
    raise die(f"{layout}/index.json names no image {REF!r}", hint="give a `bake --format oci` dir")


def unpack(layout: Path) -> Path:
    """The image's bundle (rootfs + umoci's config.json), unpacked once per digest."""
    digest = manifest_digest(layout).removeprefix("sha256:")
    root = cache_root() / "oci-rootfs"
    dest = root / digest
    if (dest / "config.json").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        rootless = [] if os.geteuid() == 0 else ["--rootless"]
        try:
            run(["umoci", "unpack", *rootless, "--image", f"{layout}:{REF}", scratch / "bundle"])
        except CommandError as exc:
            raise die(f"umoci cannot unpack {layout}: {exc.stderr.strip()}") from None
        with contextlib.suppress(OSError):  # a concurrent unpack of the same image won
            (scratch / "bundle").rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def image_user(bundle: Path) -> tuple[int, int]:
    user = json.loads((bundle / "config.json").read_text())["process"]["user"]
    return int(user.get("uid", 0)), int(user.get("gid", 0))


def runtime_spec(base: dict[str, Any], c: ContainerSpec) -> dict[str, Any]:
    """The node's config.json: umoci's translation of the image config (`base`), with
    the node's root, environment, mounts and network namespace."""
    spec: dict[str, Any] = json.loads(json.dumps(base))  # a deep copy
    spec["root"] = {"path": str(c.rootfs), "readonly": True}
    spec["hostname"] = c.hostname
    process = spec["process"]
    env = dict(item.split("=", 1) for item in process.get("env", []))
    env.update(c.env)
    process["env"] = [f"{k}={v}" for k, v in env.items()]
    process["terminal"] = False
    process["noNewPrivileges"] = True
    process["capabilities"] = {name: [] for name in CAPABILITY_SETS}
    tmpfs = ["nosuid", "nodev", "mode=1777", "size=256m"]
    spec["mounts"] = [
        *(m for m in spec.get("mounts", []) if m["destination"] not in ("/tmp", "/run")),
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": tmpfs},
        {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": tmpfs},
        {
            "destination": str(SYSTEM_STATE_DIR),
            "type": "bind",
            "source": str(c.state_dir),
            "options": ["rbind", "rw", "nosuid", "nodev"],
        },
    ]
    linux = spec.setdefault("linux", {})
    namespaces = [n for n in linux.get("namespaces", []) if n["type"] != "network"]
    linux["namespaces"] = [*namespaces, {"type": "network", "path": str(c.netns)}]
    return spec


def write_bundle(bundle_dir: Path, image_bundle: Path, c: ContainerSpec) -> None:
    """The node's bundle: only a config.json (mode 0600: it holds the node's token)."""
    base = json.loads((image_bundle / "config.json").read_text())
    bundle_dir.mkdir(mode=0o700, exist_ok=True)
    path = bundle_dir / "config.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(runtime_spec(base, c), f, indent=2)


def start(
    name: str, bundle_dir: Path, console_log: Path, *, die_with_parent: bool
) -> subprocess.Popen[bytes]:
    """`runc run` in the foreground (its own process group), output to the console log."""
    runc_root().mkdir(parents=True, exist_ok=True, mode=0o700)
    run(runc_argv("delete", "--force", name), check=False)  # a stale one of an old boot
    with console_log.open("ab") as log:
        proc = spawn(
            runc_argv("run", "--bundle", str(bundle_dir), name),
            stdout=log.fileno(),
            stderr=subprocess.STDOUT,
            die_with_parent=die_with_parent,
        )
    return proc


def state(name: str) -> str | None:
    """runc's status of the container (`running`, `stopped`, ...), None if unknown."""
    result = run(runc_argv("state", name), check=False)
    if result.returncode != 0:
        return None
    try:
        status = json.loads(result.stdout).get("status")
    except ValueError:
        return None
    return status if isinstance(status, str) else None


def stop(name: str, running: Callable[[], bool]) -> None:
    """SIGTERM (the agent cancels its run and reports), SIGKILL after STOP_GRACE_S, then
    remove the container. `running()` says whether it still runs."""
    for sig, grace_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        if not running():
            break
        run(runc_argv("kill", name, sig.name.removeprefix("SIG")), check=False)
        deadline = time.monotonic() + grace_s
        while running() and time.monotonic() < deadline:
            time.sleep(0.2)
    run(runc_argv("delete", "--force", name), check=False)
