"""Real `imagefactory serve` subprocesses on loopback for the integration tests.

Each server gets its own directory (SQLite file, secret, admin token); tests stop it by pid
in a finalizer, also when they fail.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagefactory.tokens import node_token

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180.0  # generous: CI machines can be heavily loaded


@dataclass
class ServerProcess:
    workdir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    extra_args: tuple[str, ...] = ()
    output: list[str] = field(default_factory=list)

    @property
    def db(self) -> Path:
        return self.workdir / "services.db"

    @property
    def secret_file(self) -> Path:
        return self.workdir / "secret"

    @property
    def admin_token_file(self) -> Path:
        return self.workdir / "admin-token"

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    def node_token(self, node_id: str) -> str:
        return node_token(self.secret_file.read_text().strip(), node_id)

    def start(self) -> ServerProcess:
        argv = [
            str(BIN / "imagefactory"), "serve", "--port", str(self.port), "--db", str(self.db),
            "--secret-file", str(self.secret_file),
            "--admin-token-file", str(self.admin_token_file), *self.extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.url = self._wait_listening(self.proc)
        self.port = int(self.url.rsplit(":", 1)[1])
        return self

    def _wait_listening(self, proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=1.0):
                    continue
                line = proc.stdout.readline().decode(errors="replace")
                if not line:
                    break
                self.output.append(line)
                if "listening on " in line:
                    return line.split("listening on ", 1)[1].strip()
        self.stop()
        raise AssertionError("server did not start:\n" + "".join(self.output[-20:]))

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or closed."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, signum: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db) as conn:
            return list(conn.execute(f"SELECT * FROM {table} ORDER BY 1"))

    def dump(self) -> list[tuple[Any, ...]]:
        return [(t, *r) for t in ("nodes", "reports", "pipelines") for r in self.rows(t)]


def free_port() -> int:
    """A loopback port that nothing listens on (for a master that is down)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


SLOW_PIPELINE = {
    "format": 1,
    "name": "slow-demo",
    "tasks": [
        {"id": "first", "call": "h3tasks:nap", "args": {"seconds": 0.1, "value": 1}},
        {"id": "second", "call": "h3tasks:nap", "after": ["first"], "args": {"seconds": 0}},
    ],
}
TASKS_PY = """
import os
import time


def nap(ctx, seconds, value=None):
    print(f"{ctx.task_id} naps {seconds} s")
    time.sleep(seconds)
    env = {k: os.environ.get(k) for k in ("EXECUTOR_NODE_ID", "EXECUTOR_TOKEN")}
    return {"task": ctx.task_id, "value": value, "upstream": ctx.upstream, "env": env}
"""


def write_pipeline(directory: Path, first_task_seconds: float = 0.1) -> Path:
    """A two-task pipeline whose first task sleeps `first_task_seconds`."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = json.loads(json.dumps(SLOW_PIPELINE))
    spec["tasks"][0]["args"]["seconds"] = first_task_seconds
    (directory / "pipeline.json").write_text(json.dumps(spec))
    (directory / "h3tasks.py").write_text(TASKS_PY)
    return directory


@dataclass
class AgentProcess:
    """`executor agent` as a subprocess; stdout (the console) and stderr go to files."""

    workdir: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def start(self) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXECUTOR_")}
        env.update({"EXECUTOR_STATE_DIR": str(self.state_dir), **self.env})
        with (
            (self.workdir / "console.log").open("ab") as out,
            (self.workdir / "agent.err").open("ab") as err,
        ):
            self.proc = subprocess.Popen(
                [str(BIN / "executor"), "agent"],
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return self

    def wait(self, timeout_s: float = 300) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError("agent did not finish:\n" + self.tail()) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def console(self) -> list[str]:
        return (self.workdir / "console.log").read_text().splitlines()

    def tail(self) -> str:
        err = (self.workdir / "agent.err").read_text().splitlines()[-20:]
        return "\n".join(self.console()[-10:] + err)

    def wait_for(self, path_glob: str, timeout_s: float = 120) -> Path:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = sorted(self.state_dir.glob(path_glob))
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no {path_glob} in {self.state_dir}:\n{self.tail()}")
