"""A container node whose start fails half-way leaves nothing running: its network
namespace and the master forwarder started into it are removed, also for kept nodes
(whose forwarder is meant to outlive `boot`)."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

import pytest

from imagefactory.boot import container, netns, runc, seed
from tests.processes import process_alive

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def _forwarders(name: str) -> list[int]:
    """The pids of live forwarders for container `name`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"imagefactory.boot.nsforward" in argv and name.encode() in argv:
            found.append(int(entry.name))
    return [pid for pid in found if process_alive(pid)]


@pytest.mark.parametrize("keep", [True, False])
def test_a_start_that_fails_after_the_forward_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keep: bool
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    def disk_full(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runc, "write_bundle", disk_full)  # after the forwarder started
    node_id = f"failed-{uuid.uuid4().hex[:8]}"
    plan = container.ContainerPlan(
        tmp_path / "layout", "runc", "heartbeat", 10, keep=keep, master_url="http://127.0.0.1:9"
    )
    image = container.Image(user=(os.getuid(), os.getgid()), bundle=tmp_path / "bundle")
    name = netns.netns_name(node_id)
    try:
        with pytest.raises(OSError, match="No space left on device"):
            container.start_node(plan, image, seed.NodeVars(node_id=node_id, run_id="r-1"))
        assert _forwarders(name) == []
        assert not netns.netns_path(name).exists()
    finally:
        for pid in _forwarders(name):
            os.kill(pid, 9)
        netns.delete(name)
