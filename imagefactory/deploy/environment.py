"""The environment a device gets: from the store when one was built from the pipeline's
current content, else built now through the build queue.

Submitting a build is idempotent on (target, format, the pipeline's sha256): the master
answers with the build that already succeeded, or the one queued or running, so "find
it in the store, or build it" is one request and a wait. Several devices that need the
same environment wait for the same build.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagefactory.client import AdminClient
from imagefactory.errors import UserError
from imagefactory.kinds import get_kind

TERMINAL = ("succeeded", "failed", "cancelled")
POLL_S = 1.0


class BuildFailed(UserError):
    """The environment could not be built (the build failed or was cancelled)."""


@dataclass(frozen=True)
class Environment:
    """A built environment: one stored artifact, and the registry push of an OCI one."""

    build_id: str
    target: str
    format: str
    name: str
    digest: str
    size: int
    reference: str | None = None
    """`HOST[:PORT]/REPO@sha256:...` (`http://` first for a plain-HTTP registry), what a
    container host pulls (oci builds pushed to the master's registry); None otherwise."""


def follow_build(
    client: AdminClient,
    build: dict[str, Any],
    say: Callable[[str], None] | None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Poll the build until it ends, telling `say` each state and stage as it starts and
    ends (nothing when `say` is None); returns the ended build, or the build as it is
    when `stop` is set."""
    shown_state, shown_stage, shown_done = None, None, set()
    while True:
        if say is not None:
            if (build["state"], build["attempt"]) != shown_state:
                shown_state = (build["state"], build["attempt"])
                who = f" on {build['builder_id']} (attempt {build['attempt']})"
                say(f"build: {build['state']}{who if build['builder_id'] else ''}")
            for name, seconds in build["stages"].items():
                if name not in shown_done:
                    shown_done.add(name)
                    say(f"==> {name}: done in {seconds:.1f}s")
            if build["stage"] and build["stage"] != shown_stage:
                say(f"==> {build['stage']}")
            shown_stage = build["stage"]
        if build["state"] in TERMINAL or (stop is not None and stop.is_set()):
            return build
        time.sleep(POLL_S)
        build = client.get_json(f"/v1/builds/{build['build_id']}")


def environment_for(
    client: AdminClient,
    target: str,
    kind: str,
    pipeline: str,
    say: Callable[[str], None],
    stop: threading.Event | None = None,
) -> Environment:
    """The stored environment of `pipeline` for (target, kind), built first if needed
    (waiting for the build stops when `stop` is set; the build goes on)."""
    body = {"target": target, "format": get_kind(kind).format, "pipeline": pipeline}
    build = client.post_json("/v1/builds", body)
    if build["state"] == "succeeded":
        say(f"environment in the store (build {build['build_id']})")
    else:
        say(f"building {body['format']} for {target} (build {build['build_id']})")
        build = follow_build(client, build, say, stop)
    if build["state"] not in TERMINAL:
        raise BuildFailed(f"interrupted while build {build['build_id']} was {build['state']}")
    if build["state"] != "succeeded":
        error = (build.get("error") or "").strip().splitlines()
        why = f": {error[-1]}" if error else ""
        raise BuildFailed(f"build {build['build_id']} {build['state']}{why}")
    return environment_of(build)


def environment_of(build: dict[str, Any]) -> Environment:
    """The environment a succeeded build made."""
    [artifact] = build["artifacts"]
    pushed = build.get("pushed")
    reference = None
    if pushed:
        repository, colon, tag = pushed["reference"].rpartition(":")
        if not colon or "/" in tag:  # no tag: the colon was the registry's port
            repository = pushed["reference"]
        scheme = "http://" if pushed.get("plain_http") else ""
        reference = f"{scheme}{repository}@{pushed['digest']}"
    return Environment(
        build_id=build["build_id"],
        target=build["target"],
        format=build["format"],
        name=artifact["name"],
        digest=artifact["digest"],
        size=artifact["size"],
        reference=reference,
    )
