"""`boot` and `stop` before any VM starts: node fan-out, image lookup, bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from imagefactory.boot import console, launch, nodestate, qemu
from imagefactory.boot.waiting import BootedNode
from imagefactory.cli import boot as cmd_boot
from imagefactory.cli.main import main
from imagefactory.errors import HostError


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def test_count_fans_out_node_and_run_ids() -> None:
    assert launch.node_ids("n", 1) == ["n"]
    assert launch.node_ids("n", 3) == ["n-1", "n-2", "n-3"]
    assert cmd_boot.run_ids("R", 1) == ["R"]
    assert cmd_boot.run_ids("R", 2) == ["R-1", "R-2"]
    generated = cmd_boot.run_ids(None, 2)
    assert len(set(generated)) == 2


def test_image_target_comes_from_the_manifest(tmp_path: Path) -> None:
    image = tmp_path / "image.qcow2"
    image.touch()
    assert cmd_boot.image_target(image, "aarch64-linux").name == "aarch64-linux"
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "aarch64-linux"}))
    assert cmd_boot.image_target(image, None).name == "aarch64-linux"


def test_find_image_accepts_a_bake_output_directory(tmp_path: Path) -> None:
    (tmp_path / "x.qcow2").touch()
    assert launch.find_image(tmp_path) == tmp_path / "x.qcow2"


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["boot", "/nonexistent.qcow2", "--node-id", "n"], "does not exist"),
        (["boot", "{image}", "--node-id", "n", "--master", "http://10.1.2.3:80"], "loopback"),
        (["boot", "{image}", "--node-id", "n", "--count", "2", "--token", "t"], "one node"),
        (["boot", "{image}", "--node-id", "bad/id"], "invalid node ID"),
        (["boot", "{image}", "--node-id", "n", "--env", "A=1\n2"], "contains a newline"),
        (["stop"], "name the nodes"),
        (["stop", "ghost"], "no booted node 'ghost'"),
        (["ssh", "ghost", "--", "true"], "no booted node 'ghost'"),
    ],
)
def test_bad_input_is_one_line_and_starts_nothing(
    tmp_path: Path, state_home: Path, args: list[str], message: str
) -> None:
    image = tmp_path / "image.qcow2"
    image.write_bytes(b"")
    code, output = invoke(*(a.replace("{image}", str(image)) for a in args))
    assert code == 2, output
    assert output.startswith("Error: ") and message in output
    assert "Traceback" not in output
    assert nodestate.booted_nodes() == []


def test_a_stale_record_of_a_dead_node_is_cleared(state_home: Path) -> None:
    workdir = nodestate.node_dir("n")
    workdir.mkdir(parents=True)
    nodestate.save(
        nodestate.NodeRecord(
            node_id="n",
            run_id="r",
            instance_id="i",
            backend="qemu",
            ssh_port=1,
            ssh_user="ops",
            ssh_key="k",
            workdir=str(workdir),
            console_log="c",
            pid=1,  # alive, but not QEMU: treated as gone
        )
    )
    assert launch.claim_workdir("n") == workdir  # a stale record is cleared
    assert not (workdir / nodestate.RECORD).exists()


def test_an_unreadable_image_leaves_no_node_behind(tmp_path: Path, state_home: Path) -> None:
    image = tmp_path / "broken.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\xff" * 60)  # a qcow2 magic with a corrupt header
    code, output = invoke("boot", str(image), "--node-id", "n", "--accel", "tcg")
    assert code == 2 and "is not a disk image QEMU can read" in output, output
    assert not nodestate.node_dir("n").exists()


@pytest.mark.parametrize("failing", ["save", "ssh_port"])
def test_a_started_vm_whose_record_cannot_be_saved_is_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The caller's cleanup knows only the record from before the start (no pid): a kept
    VM would run on, unrecorded, for `stop` to never find. The same if QEMU cannot say
    which SSH port it bound."""
    stopped: list[str] = []

    class StartedQemu:
        pid = 4242

        def ssh_port(self) -> int:
            if failing == "ssh_port":
                raise HostError("QEMU of fleetbake-n failed at start: no monitor")
            return 2222

        def stop(self) -> None:
            stopped.append("qemu")

    def disk_full(_record: nodestate.NodeRecord) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qemu, "start", lambda *_args, **_kwargs: StartedQemu())
    monkeypatch.setattr(nodestate, "save", disk_full)
    plan = SimpleNamespace(backend="qemu", keeps_nodes=True)
    config = SimpleNamespace(console_log=tmp_path / "console.log", name="fleetbake-n")
    record = nodestate.NodeRecord(
        node_id="n", run_id="r", instance_id="i", backend="qemu", ssh_port=0, ssh_user="ops",
        ssh_key="k", workdir=str(tmp_path), console_log=str(tmp_path / "console.log"),
    )  # fmt: skip
    prepared = launch.PreparedNode(config, record, "ssh-ed25519 AAAA")  # type: ignore[arg-type]
    with pytest.raises(HostError if failing == "ssh_port" else OSError):
        launch.start_node(plan, prepared)  # type: ignore[arg-type]
    assert stopped == ["qemu"]


class SlowToStop:
    """A node whose stop takes long enough for the user to press Ctrl-C (again)."""

    def __init__(self, stopped: list[str], name: str) -> None:
        self.stopped, self.name = stopped, name

    def running(self) -> bool:
        return True

    def stop(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        self.stopped.append(self.name)


def _booted(tmp_path: Path, stopped: list[str], name: str) -> BootedNode:
    workdir = tmp_path / name
    workdir.mkdir()
    record = nodestate.NodeRecord(
        node_id=name, run_id="r", instance_id="i", backend="qemu", ssh_port=22, ssh_user="ops",
        ssh_key="k", workdir=str(workdir), console_log=str(workdir / "console.log"),
    )  # fmt: skip
    machine = SlowToStop(stopped, name)
    return BootedNode(record, machine, console.ConsoleFollower(workdir / "c"), 0.0)


@pytest.mark.parametrize("on_its_way_out", [None, RuntimeError("the wait failed")])
def test_ctrl_c_during_cleanup_stops_every_node_first(
    tmp_path: Path, on_its_way_out: Exception | None
) -> None:
    """Then the interrupt, unless another exception is already ending the boot."""
    stopped: list[str] = []
    said: list[str] = []
    handler = signal.getsignal(signal.SIGINT)
    booted = [_booted(tmp_path, stopped, name) for name in ("n-1", "n-2", "n-3")]
    with pytest.raises(KeyboardInterrupt if on_its_way_out is None else RuntimeError):
        try:
            if on_its_way_out is not None:
                raise on_its_way_out
        finally:
            launch.cleanup_all(booted, said.append)
    assert stopped == ["n-1", "n-2", "n-3"]
    assert said == ["stopping the nodes first (this cannot be interrupted)"]
    assert signal.getsignal(signal.SIGINT) is handler


class FailsToStop(SlowToStop):
    def stop(self) -> None:
        self.stopped.append(self.name)
        raise HostError(f"libvirt: cannot stop domain {self.name}: busy")


def test_a_node_that_cannot_be_stopped_does_not_keep_the_others_running(tmp_path: Path) -> None:
    stopped: list[str] = []
    said: list[str] = []
    booted = [_booted(tmp_path, stopped, name) for name in ("n-1", "n-2", "n-3")]
    booted[0].machine = FailsToStop(stopped, "n-1")
    with pytest.raises(HostError, match="cannot stop domain n-1"):
        launch.cleanup_all(booted, said.append)
    assert stopped == ["n-1", "n-2", "n-3"]
    assert said[0] == "node n-1: cannot clean up: libvirt: cannot stop domain n-1: busy"
