"""One build attempt on the builder against a fake master: the lease kept alive while an
OCI image is pushed (a fake skopeo on PATH that outlasts the lease), and a failure report
cut to what the master accepts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from imagefactory.builder.master import LeaseLost, Refused
from imagefactory.builder.worker import BuilderConfig, Job, Worker

LEASE_S = 1.0
DIGEST = "sha256:" + "ab" * 32


class LeasingMaster:
    """Holds one lease as the master does: lost unless renewed within LEASE_S; a finish
    is validated as the Finish schema does (error up to 16384 characters)."""

    url = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.renewed = time.monotonic()
        self.heartbeats: list[dict[str, Any]] = []
        self.finished: list[dict[str, Any]] = []
        self.requeued = False

    def _lease(self) -> None:
        if time.monotonic() - self.renewed > LEASE_S:
            raise LeaseLost("409 the build is not yours")
        self.renewed = time.monotonic()

    def heartbeat(self, _b: str, _a: int, progress: dict[str, Any]) -> bool:
        if self.requeued:
            raise LeaseLost("409 the build is not yours")
        self._lease()
        self.heartbeats.append(progress)
        return False

    def upload_status(self, _b: str, _a: int, _digest: str, _size: int) -> tuple[int, bool]:
        self._lease()
        return 0, True  # already stored: nothing to send

    def finish(self, _b: str, _a: int, outcome: dict[str, Any]) -> dict[str, Any]:
        self._lease()
        if len(outcome.get("error") or "") > 16384:
            raise Refused(422, "Unprocessable Entity", {"error": "error too long"})
        self.finished.append(outcome)
        return {"state": outcome["state"]}


def _job(tmp_path: Path, master: LeasingMaster) -> Job:
    config = BuilderConfig("b1", tmp_path / "work", ("qemu",), ("oci",))
    build = {
        "build_id": "bld1", "attempt": 1, "target": "qemu", "format": "oci",
        "pipeline": "Demo",
    }  # fmt: skip
    job = {"build": build, "lease_s": LEASE_S, "registry": "http://127.0.0.1:5000"}
    return Job(Worker(config, master), job)  # type: ignore[arg-type]


@pytest.fixture
def slow_skopeo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A skopeo that takes three leases to push, then writes its --digestfile."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    skopeo = bin_dir / "skopeo"
    skopeo.write_text(
        "#!/bin/sh\n"
        f"sleep {3 * LEASE_S}\n"
        'while [ "$1" != --digestfile ]; do shift; done\n'
        f'printf "%s\\n" {DIGEST} > "$2"\n'
    )
    skopeo.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return skopeo


def _summary(tmp_path: Path) -> dict[str, Any]:
    image = tmp_path / "demo.oci.tar"
    image.write_bytes(b"an oci archive")
    (tmp_path / "layout").mkdir()
    return {"images": [{"image": str(image), "dir": str(tmp_path / "layout")}]}


@pytest.mark.usefixtures("slow_skopeo")
def test_a_push_longer_than_the_lease_keeps_it_and_finishes(tmp_path: Path) -> None:
    master = LeasingMaster()
    job = _job(tmp_path, master)
    delivered = job._deliver(_summary(tmp_path), {"bake": 1.5})
    job._report({"state": "succeeded", **delivered})
    assert master.finished[0]["state"] == "succeeded"
    assert master.finished[0]["pushed"] == {
        "reference": "127.0.0.1:5000/fleetbake/demo:bld1",
        "digest": DIGEST,
    }
    assert len(master.heartbeats) >= 3
    assert master.heartbeats[0] == {"stage": "push", "stages": {"bake": 1.5}, "log": []}


@pytest.mark.usefixtures("slow_skopeo")
def test_a_lease_lost_during_the_push_is_not_reported(tmp_path: Path) -> None:
    master = LeasingMaster()
    master.requeued = True  # e.g. by an operator, or after a master restart
    job = _job(tmp_path, master)
    with pytest.raises(LeaseLost):
        job._deliver(_summary(tmp_path), {})


def test_a_long_failure_report_is_cut_to_its_end(tmp_path: Path) -> None:
    master = LeasingMaster()
    error = "bake exited with 1:\n" + "\n".join(f"line {i} " + "x" * 2000 for i in range(20))
    _job(tmp_path, master)._report({"state": "failed", "error": error})
    [reported] = master.finished
    assert reported["state"] == "failed"
    assert len(reported["error"]) <= 16384
    assert reported["error"].endswith("line 19 " + "x" * 2000)
