"""Real `imagefactory serve` and `imagefactory builder` processes for the build service
tests, and the admin calls they make; everything is stopped by pid at the end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from executor.pack import pack
from imagefactory.tokens import builder_token
from tests.integration.services_harness import BIN, ServerProcess
from tests.processes import process_alive

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hello"
TARGET = "x86_64-linux"
SECRET = "shared-secret"
ADMIN = "shared-admin"
WAIT_S = 240.0


@dataclass
class BuilderProcess:
    workdir: Path
    url: str
    builder_id: str
    proc: subprocess.Popen[bytes] | None = None
    grace_s: float = 30.0
    extra: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.builder_id}.log"

    def start(self) -> BuilderProcess:
        token = self.workdir / f"{self.builder_id}.token"
        token.write_text(builder_token(SECRET, self.builder_id) + "\n")
        argv = [
            str(BIN / "imagefactory"), "builder", "--master", self.url,
            "--builder-id", self.builder_id, "--token-file", str(token),
            "--work-dir", str(self.workdir / f"{self.builder_id}-work"),
            "--grace-seconds", str(self.grace_s),
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def bake_child(self, timeout_s: float = WAIT_S) -> int:
        """The pid of the bake this builder runs, as soon as it exists."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            for pid in children.read_text().split():
                if b"\0bake\0" in _cmdline(int(pid)):  # not `packer version` of doctor
                    return int(pid)
            time.sleep(0.005)
        raise AssertionError(f"{self.builder_id} started no bake:\n{self.log()}")

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signum)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):  # it has just exited
        return b""


@dataclass
class Fleet:
    """Servers and builders of one test; everything is stopped by pid at the end."""

    workdir: Path
    db: str | None = None
    servers: list[ServerProcess] = field(default_factory=list)
    builders: list[BuilderProcess] = field(default_factory=list)
    frozen: list[int] = field(default_factory=list)

    def server(
        self, lease_s: float = 30.0, port: int = 0, name: str = "", extra: tuple[str, ...] = ()
    ) -> ServerProcess:
        server = ServerProcess(self.workdir / (name or f"server{len(self.servers)}"), port=port)
        server.workdir.mkdir(exist_ok=True)
        server.secret_file.write_text(SECRET + "\n")
        server.admin_token_file.write_text(ADMIN + "\n")
        args = ["--store-dir", str(self.workdir / "store"), "--lease-seconds", str(lease_s)]
        server.extra_args = (*args, *extra, *(("--db", self.db) if self.db else ()))
        self.servers.append(server)
        return server.start()

    def builder(self, url: str, builder_id: str, grace_s: float = 30.0) -> BuilderProcess:
        builder = BuilderProcess(self.workdir, url, builder_id, grace_s=grace_s)
        self.builders.append(builder)
        return builder.start()

    def freeze(self, pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)
        self.frozen.append(pid)

    def thaw(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass  # it ended already

    def close(self) -> None:
        for pid in self.frozen:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        for builder in self.builders:
            builder.stop()
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {b.builder_id}\n{b.log()[-3000:]}" for b in self.builders)


def admin(url: str, method: str, path: str, **kwargs: Any) -> Any:
    response = httpx.request(
        method, url + path, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60, **kwargs
    )
    assert response.is_success, response.text
    return response.json()


def publish_pipelines(url: str, workdir: Path, count: int) -> list[str]:
    """`count` distinct pipelines (the hello example under other names), published."""
    names = []
    for i in range(count):
        name = f"hello-{i}"
        source = workdir / "pipelines" / name
        source.mkdir(parents=True)
        spec = json.loads((EXAMPLE / "pipeline.json").read_text())
        spec["name"] = name
        (source / "pipeline.json").write_text(json.dumps(spec))
        (source / "hello.py").write_text((EXAMPLE / "hello.py").read_text())
        archive = workdir / "pipelines" / f"{name}.tar.gz"
        pack(source, archive)
        admin(url, "PUT", f"/v1/pipelines/{name}", content=archive.read_bytes())
        names.append(name)
    return names


def submit(url: str, pipeline: str, image_format: str = "installer") -> dict[str, Any]:
    body = {"target": TARGET, "format": image_format, "pipeline": pipeline}
    build: dict[str, Any] = admin(url, "POST", "/v1/builds", json=body)
    return build


def wait_for(fleet: Fleet, what: str, check: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{fleet.logs()}")


def build_state(url: str, build_id: str) -> dict[str, Any]:
    build: dict[str, Any] = admin(url, "GET", f"/v1/builds/{build_id}")
    return build


def ended(url: str, build_id: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        build = build_state(url, build_id)
        return build if build["state"] in ("succeeded", "failed", "cancelled") else None

    return check


def pending_signals(pid: int) -> int:
    """The signals waiting for a (stopped) process, as the kernel's bit mask."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or reaped between open and read
        return 0
    masks = [line.split()[1] for line in status.splitlines() if line[:6] in ("SigPnd", "ShdPnd")]
    return sum(int(mask, 16) for mask in masks)


def signal_pending(pid: int, signum: int) -> Callable[[], bool]:
    return lambda: bool(pending_signals(pid) & (1 << (signum - 1)))
