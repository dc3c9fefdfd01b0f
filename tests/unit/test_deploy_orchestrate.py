"""deploy/undeploy across devices (imagefactory/deploy/orchestrate.py) with the master's
API and the transports faked: which kind and target each device gets, the node identity,
the deployment record, the waits, and that one device's failure leaves the others alone.
The real parts run in tests/e2e/test_deploy.py."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from imagefactory.deploy import orchestrate
from imagefactory.deploy.environment import environment_of
from imagefactory.deploy.orchestrate import Deployer, DeploySettings, StepFailed
from imagefactory.deploy.transports import Placement
from imagefactory.errors import UserError, die
from imagefactory.tokens import node_token

DIGEST = "sha256:" + "ab" * 32


def build(fmt: str, state: str = "succeeded", error: str | None = None) -> dict[str, Any]:
    pushed = {"reference": "127.0.0.1:5000/fleetbake/etl:b1", "digest": "sha256:" + "cd" * 32}
    return {
        "build_id": "b" * 32,
        "target": "x86_64-linux",
        "format": fmt,
        "state": state,
        "attempt": 1,
        "builder_id": "b1",
        "stage": None,
        "stages": {},
        "error": error,
        "artifacts": [{"name": "x", "digest": DIGEST, "size": 3}] if state == "succeeded" else [],
        "pushed": pushed if fmt == "oci" else None,
    }


class FakeMaster:
    """The admin API deploy uses: devices, builds; records what was written."""

    url = "http://127.0.0.1:1"

    def __init__(self, devices: dict[str, dict[str, Any]], builds: dict[str, str] | None = None):
        self.devices = {k: {"id": k, "deployment": None, **v} for k, v in devices.items()}
        self.build_state = builds or {}
        self.lock = threading.Lock()
        self.submitted: list[dict[str, Any]] = []
        self.statuses: dict[str, str | None] = {}
        self.silent = False
        self.earlier_run = False

    def get_json(self, path: str, **_: Any) -> Any:
        if path == "/v1/devices":
            return list(self.devices.values())
        device_id = path.removeprefix("/v1/devices/")
        if device_id not in self.devices:
            raise die(f"GET {path}: 404 no device {device_id}")
        return dict(self.devices[device_id])

    def post_json(self, path: str, body: Any = None) -> Any:
        assert path == "/v1/builds"
        with self.lock:
            self.submitted.append(body)
        state = self.build_state.get(body["format"], "succeeded")
        return build(body["format"], state, "bake: error: boom" if state == "failed" else None)

    def put_json(self, path: str, body: Any) -> Any:
        path, _, query = path.partition("?")
        device_id = path.removeprefix("/v1/devices/").removesuffix("/deployment")
        with self.lock:
            if query == "if_undeployed=true" and self.devices[device_id]["deployment"]:
                raise die(f"PUT {path}: 409 device {device_id} has a deployment")
            self.devices[device_id]["deployment"] = body
        return body

    def poll_json(self, path: str) -> Any:
        """The master's view of runs (`statuses`: run id -> status) and nodes."""
        if path == "/v1/nodes":
            deployed = [d["deployment"] for d in self.devices.values() if d["deployment"]]
            if self.earlier_run:  # the node id's previous node, still listed alive
                return [{**d, "run_id": "r-earlier", "alive": True} for d in deployed]
            return [] if self.silent else [{**d, "alive": True} for d in deployed]
        status = self.statuses.get(path.removeprefix("/v1/runs/"))
        return None if status is None else {"status": status}

    def nodes(self) -> list[str]:
        return [d["deployment"]["node_id"] for d in self.devices.values() if d["deployment"]]

    def delete(self, path: str) -> None:
        device_id = path.removeprefix("/v1/devices/").removesuffix("/deployment")
        self.devices[device_id]["deployment"] = None


class FakeTransport:
    def __init__(self, fail: str | None = None) -> None:
        self.placed: list[Placement] = []
        self.removed: list[dict[str, Any]] = []
        self.fail = fail

    def place(self, placement: Placement, say: Callable[[str], None]) -> dict[str, Any]:
        if self.fail and placement.device["id"] == self.fail:
            raise die("the hypervisor is unreachable")
        self.placed.append(placement)
        libvirt = placement.device.get("libvirt")  # a VM's record names its hypervisor
        return {"where": placement.device["id"], **({"uri": libvirt["uri"]} if libvirt else {})}

    def remove(
        self, device: dict[str, Any], deployment: dict[str, Any], say: Callable[[str], None]
    ) -> None:
        self.removed.append(deployment)

    def last_lines(self, details: dict[str, Any]) -> list[str]:
        return [f"console of {details['where']}"]

    def local(self, device: dict[str, Any]) -> bool:
        return True


DEVICES = {
    "hv-1": {"arch": "x86_64", "kinds": ["vm", "container"], "libvirt": {"uri": "qemu:///system"}},
    "ctr-1": {"arch": "x86_64", "kinds": ["container"], "container": {"host": "local"}},
    "metal-1": {
        "arch": "aarch64",
        "kinds": ["baremetal"],
        "ssh": {"address": "root@10.0.0.7"},
        "master_url": "https://10.0.0.5:8750",
    },
}
SETTINGS = DeploySettings(pipeline="etl", master="http://127.0.0.1:8750", secret="s3cret")


def deployer(master: FakeMaster, transports: dict[str, FakeTransport]) -> Deployer:
    return Deployer(master, transports, lambda _line: None)  # type: ignore[arg-type]


@pytest.fixture
def kinds() -> dict[str, FakeTransport]:
    return {"vm": FakeTransport(), "container": FakeTransport(), "baremetal": FakeTransport()}


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orchestrate, "POLL_S", 0.01)


def test_each_device_gets_its_first_kind_a_fresh_node_and_a_record(
    kinds: dict[str, FakeTransport],
) -> None:
    master = FakeMaster(DEVICES)
    results = deployer(master, kinds).deploy(list(DEVICES), SETTINGS)
    by_device = {r.device: r for r in results}
    assert [r.status for r in results] == ["deployed"] * 3
    assert {d: (r.kind, r.target) for d, r in by_device.items()} == {
        "hv-1": ("vm", "x86_64-linux"),
        "ctr-1": ("container", "x86_64-linux"),
        "metal-1": ("baremetal", "aarch64-linux"),
    }
    assert sorted(b["format"] for b in master.submitted) == ["installer", "oci", "qcow2"]
    [vm] = kinds["vm"].placed
    assert vm.node.node_id.startswith("hv-1-") and len(vm.node.node_id) == len("hv-1-") + 6
    assert vm.node.token == node_token("s3cret", vm.node.node_id)
    assert vm.node.master_url == SETTINGS.master and vm.environment.digest == DIGEST
    [ctr] = kinds["container"].placed
    assert ctr.environment.reference == "127.0.0.1:5000/fleetbake/etl@sha256:" + "cd" * 32
    [metal] = kinds["baremetal"].placed
    assert metal.node.master_url == "https://10.0.0.5:8750"  # the device's own view
    record = master.devices["hv-1"]["deployment"]
    assert record["node_id"] == vm.node.node_id and record["run_id"] == vm.node.run_id
    assert record["details"] == {
        "where": "hv-1",
        "uri": "qemu:///system",
        "placed_on": socket.gethostname(),
    }
    assert record["environment"] == DIGEST


def test_fresh_identities_differ_between_deploys(kinds: dict[str, FakeTransport]) -> None:
    master = FakeMaster({"hv-1": DEVICES["hv-1"]})
    deployer(master, kinds).deploy(["hv-1"], SETTINGS)
    again = DeploySettings(**{**SETTINGS.__dict__, "replace": True})
    deployer(master, kinds).deploy(["hv-1"], again)
    first, second = kinds["vm"].placed
    assert first.node.node_id != second.node.node_id and first.node.run_id != second.node.run_id
    assert kinds["vm"].removed[0]["node_id"] == first.node.node_id  # replaced, not left behind


def test_a_failing_device_does_not_stop_the_others(kinds: dict[str, FakeTransport]) -> None:
    kinds["vm"] = FakeTransport(fail="hv-1")
    master = FakeMaster(DEVICES)
    results = {r.device: r for r in deployer(master, kinds).deploy(list(DEVICES), SETTINGS)}
    assert results["hv-1"].status == "failed"
    assert results["hv-1"].error == "the hypervisor is unreachable"
    assert master.devices["hv-1"]["deployment"] is None
    assert results["ctr-1"].status == results["metal-1"].status == "deployed"


def test_a_failed_build_names_the_build_and_its_last_line(kinds: dict[str, FakeTransport]) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]}, builds={"oci": "failed"})
    [result] = deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    assert result.status == "failed"
    assert result.error == f"build {'b' * 32} failed: bake: error: boom"
    assert not kinds["container"].placed


def test_a_device_that_runs_a_node_is_refused_without_replace(
    kinds: dict[str, FakeTransport],
) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    [again] = deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    assert again.status == "failed" and "already runs node ctr-1-" in (again.error or "")
    assert "undeploy ctr-1" in (again.error or "") and len(kinds["container"].placed) == 1


def test_unknown_devices_are_refused_before_any_work(kinds: dict[str, FakeTransport]) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    with pytest.raises(UserError, match="not in the inventory: nope, gone"):
        deployer(master, kinds).check_known(["nope", "ctr-1", "gone"])
    assert not master.submitted
    deployer(master, kinds).check_known(["ctr-1"])


def test_a_device_removed_meanwhile_fails_alone(kinds: dict[str, FakeTransport]) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    results = deployer(master, kinds).deploy(["nope", "ctr-1"], SETTINGS)
    assert [r.status for r in results] == ["failed", "deployed"]
    assert "404 no device nope" in (results[0].error or "")


@pytest.mark.parametrize(
    ("wait", "status", "seen", "error"),
    [
        ("report", "succeeded", "report (succeeded)", None),
        ("report", "failed", None, "the run ended failed"),
        ("heartbeat", None, "heartbeat", None),
    ],
)
def test_waits(
    kinds: dict[str, FakeTransport],
    wait: str,
    status: str | None,
    seen: str | None,
    error: str | None,
) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})

    class Reporting(FakeTransport):
        def place(self, placement: Placement, say: Callable[[str], None]) -> dict[str, Any]:
            assert placement.node.run_id is not None
            master.statuses[placement.node.run_id] = status
            return super().place(placement, say)

    kinds["container"] = Reporting()
    settings = DeploySettings(**{**SETTINGS.__dict__, "wait": wait})
    [result] = deployer(master, kinds).deploy(["ctr-1"], settings)
    assert (result.wait, result.error) == (seen, error)


@pytest.mark.parametrize("listed", ["nothing", "an earlier run"])
def test_a_silent_node_times_out_and_stays_recorded(
    kinds: dict[str, FakeTransport], listed: str
) -> None:
    settings = DeploySettings(**{**SETTINGS.__dict__, "wait": "heartbeat", "timeout_s": 0.05})
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    master.silent, master.earlier_run = listed == "nothing", listed == "an earlier run"
    said: list[str] = []
    [result] = Deployer(master, kinds, said.append).deploy(["ctr-1"], settings)  # type: ignore[arg-type]
    assert result.status == "failed" and "no heartbeat from node ctr-1-" in (result.error or "")
    assert "[ctr-1] console: console of ctr-1" in said
    assert master.devices["ctr-1"]["deployment"] is not None  # undeploy can still remove it


def test_undeploy_removes_and_clears_and_leaves_empty_devices_alone(
    kinds: dict[str, FakeTransport],
) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"], "hv-1": DEVICES["hv-1"]})
    deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    node = master.devices["ctr-1"]["deployment"]["node_id"]
    results = deployer(master, kinds).undeploy(["ctr-1", "hv-1"])
    assert [(r.status, r.node_id) for r in results] == [("undeployed", node), ("unchanged", None)]
    assert [d["node_id"] for d in kinds["container"].removed] == [node]
    assert master.devices["ctr-1"]["deployment"] is None


def test_choose_follows_the_preference_order() -> None:
    device = {"arch": "aarch64", "kinds": ["container", "vm"]}
    kind, target = orchestrate.choose(device)
    assert (kind, target.name) == ("container", "aarch64-linux")
    with pytest.raises(StepFailed, match="no target builds vm for riscv64"):
        orchestrate.choose({"arch": "riscv64", "kinds": ["vm"]})


@pytest.mark.parametrize(
    ("pushed", "reference"),
    [
        ({"reference": "reg.example:5000/fleetbake/etl:b1", "plain_http": False},
         "reg.example:5000/fleetbake/etl@sha256:" + "cd" * 32),
        ({"reference": "127.0.0.1:5000/fleetbake/etl:b1", "plain_http": True},
         "http://127.0.0.1:5000/fleetbake/etl@sha256:" + "cd" * 32),
        ({"reference": "127.0.0.1:5000/fleetbake/etl", "plain_http": False},
         "127.0.0.1:5000/fleetbake/etl@sha256:" + "cd" * 32),
    ],
)  # fmt: skip
def test_the_pull_reference_is_pinned_and_says_plain_http(
    pushed: dict[str, Any], reference: str
) -> None:
    made = build("oci")
    made["pushed"] = {**pushed, "digest": "sha256:" + "cd" * 32}
    assert environment_of(made).reference == reference
    assert environment_of(build("qcow2")).reference is None


def test_a_failed_place_releases_the_reservation(kinds: dict[str, FakeTransport]) -> None:
    kinds["container"] = FakeTransport(fail="ctr-1")
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    [result] = deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    assert result.status == "failed" and master.devices["ctr-1"]["deployment"] is None


def test_a_deploy_beside_another_gets_no_second_node(kinds: dict[str, FakeTransport]) -> None:
    """The device is reserved (PUT ...?if_undeployed=true) before anything is placed."""
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})

    class Racing(FakeTransport):
        def place(self, placement: Placement, say: Callable[[str], None]) -> dict[str, Any]:
            [other] = deployer(master, {"container": FakeTransport()}).deploy(["ctr-1"], again)
            assert other.status == "failed" and "already runs node" in (other.error or "")
            return super().place(placement, say)

    again = DeploySettings(**{**SETTINGS.__dict__, "replace": False})
    master.devices["ctr-1"]["deployment"] = None
    kinds["container"] = Racing()
    [result] = deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    assert result.status == "deployed" and len(kinds["container"].placed) == 1


def test_a_local_node_is_undeployed_only_where_it_runs(
    kinds: dict[str, FakeTransport], monkeypatch: pytest.MonkeyPatch
) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    deployer(master, kinds).deploy(["ctr-1"], SETTINGS)
    assert master.devices["ctr-1"]["deployment"]["details"]["placed_on"] == socket.gethostname()
    monkeypatch.setattr(socket, "gethostname", lambda: "elsewhere")
    [result] = deployer(master, kinds).undeploy(["ctr-1"])
    assert result.status == "failed" and "undeploy it on" in (result.error or "")
    assert master.devices["ctr-1"]["deployment"] is not None and not kinds["container"].removed


def test_forget_clears_the_record_and_touches_nothing(kinds: dict[str, FakeTransport]) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    master.devices["ctr-1"]["deployment"] = {
        "kind": "container", "target": "x86_64-linux", "environment": DIGEST,
        "node_id": "ctr-1-abcdef", "run_id": "r", "details": {"placing_on": "h"},
    }  # fmt: skip
    [stuck] = deployer(master, kinds).undeploy(["ctr-1"])
    assert stuck.status == "failed" and "undeploy --forget ctr-1" in (stuck.error or "")
    [forgotten] = deployer(master, kinds).undeploy(["ctr-1"], forget=True)
    assert forgotten.status == "forgotten" and master.devices["ctr-1"]["deployment"] is None
    assert not kinds["container"].removed


def test_bad_node_settings_are_refused_before_any_device(kinds: dict[str, FakeTransport]) -> None:
    master = FakeMaster({"ctr-1": DEVICES["ctr-1"]})
    bad = DeploySettings(**{**SETTINGS.__dict__, "env": (("EXECUTOR_TOKEN", "x"),)})
    with pytest.raises(UserError, match="--env cannot set EXECUTOR_TOKEN"):
        deployer(master, kinds).deploy(["ctr-1"], bad)
    assert not master.submitted


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"node_id": "0123456789abcdef"}, "which deploy does not make"),
        ({"details": {"uri": "qemu+ssh://h/system?command=/tmp/x", "placed_on": "h"}},
         "names hypervisor 'qemu+ssh://h/system?command=/tmp/x', not the device's"),
    ],
)  # fmt: skip
def test_a_tampered_record_is_not_followed(
    kinds: dict[str, FakeTransport], change: dict[str, Any], error: str
) -> None:
    master = FakeMaster({"hv-1": DEVICES["hv-1"]})
    deployer(master, kinds).deploy(["hv-1"], SETTINGS)
    master.devices["hv-1"]["deployment"].update(change)
    [result] = deployer(master, kinds).undeploy(["hv-1"])
    assert result.status == "failed" and error in (result.error or ""), result.error
    assert not kinds["vm"].removed
