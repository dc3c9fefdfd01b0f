"""Run install.sh on several devices at once, each in its own thread:

    per device: connect (host-key policy) ─► mktemp -d ─► SFTP install.sh (+ token, 0600)
      ─► [sudo -n] sh install.sh ARGS, output streamed as `[device] line`
      ─► rm -rf the upload ─► `after` (the CLI's --wait) ─► Outcome

A device that fails (unreachable, refused key, a refusal of install.sh, a timed-out
wait) is recorded with the reason and never stops the others.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from imagefactory.install.destination import Destination
from imagefactory.install.hostkeys import HostKeyPolicy
from imagefactory.install.remote import RemoteError, connect, run_quiet, run_streaming, upload

NOTHING_TO_CHANGE = "nothing to change"
"""What install.sh says when it found everything in place (a no-op run)."""
OWN_OPTIONS = {
    "EXECUTOR_NODE_ID": "--node-id",
    "EXECUTOR_RUN_ID": "--run-id",
    "EXECUTOR_MASTER_URL": "--master",
    "EXECUTOR_ON_COMPLETE": "--on-complete",
}
"""node.env variables install.sh takes as options of their own; the rest go as --env."""


@dataclass(frozen=True)
class Job:
    """What to do on one device."""

    dest: Destination
    node_id: str | None
    """None for --uninstall."""
    args: tuple[str, ...]
    """install.sh's arguments (identity options, or --uninstall [--purge])."""
    token: str | None = None
    """Uploaded as a 0600 file next to install.sh, never put on a command line."""


def node_job(dest: Destination, node_env: list[tuple[str, str]]) -> Job:
    """The install of a node on `dest` from its node.env pairs (`NodeVars.env()`, which
    validates them): install.sh takes them as options, the token as a file of its own."""
    args: list[str] = []
    values = dict(node_env)
    for key, value in node_env:
        if key in OWN_OPTIONS:
            args += [OWN_OPTIONS[key], value]
        elif key != "EXECUTOR_TOKEN":
            args += ["--env", f"{key}={value}"]
    return Job(dest, values["EXECUTOR_NODE_ID"], tuple(args), values.get("EXECUTOR_TOKEN"))


@dataclass
class Outcome:
    dest: Destination
    node_id: str | None
    status: str = "pending"
    """installed, unchanged, uninstalled or failed."""
    error: str | None = None
    wait: str | None = None
    """What the wait saw (e.g. `heartbeat`), when there was one."""
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "ssh": str(self.dest),
            "node_id": self.node_id,
            "status": self.status,
            "error": self.error,
            "wait": self.wait,
            "elapsed_s": round(self.elapsed_s, 1),
            **self.extra,
        }


@dataclass(frozen=True)
class Session:
    """A connected device, for the `after` step (e.g. following its journal)."""

    client: paramiko.SSHClient
    sudo: str
    """`sudo -n ` unless the login is root's."""
    outcome: Outcome


After = Callable[[Session], str | None]
"""Runs after a successful install; returns what it waited for, raises RemoteError."""


@dataclass(frozen=True)
class Fleet:
    script: Path
    policy: HostKeyPolicy
    identity_file: Path | None
    progress: Callable[[str], None]
    after: After | None = None

    def run(self, jobs: list[Job]) -> list[Outcome]:
        script = self.script.read_bytes()
        with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
            return list(pool.map(lambda job: self._one(job, script), jobs))

    def _one(self, job: Job, script: bytes) -> Outcome:
        outcome = Outcome(job.dest, job.node_id)
        started = time.monotonic()
        say = _prefixed(self.progress, str(job.dest))
        try:
            self._install(job, script, outcome, say)
        except RemoteError as exc:
            outcome.status, outcome.error = "failed", str(exc)
            say(f"FAILED: {exc}")
        except Exception as exc:  # noqa: BLE001 - one device's surprise must not stop the rest
            outcome.status, outcome.error = "failed", f"{type(exc).__name__}: {exc}"
            say(f"FAILED: {outcome.error}")
        outcome.elapsed_s = time.monotonic() - started
        return outcome

    def _install(
        self, job: Job, script: bytes, outcome: Outcome, say: Callable[[str], None]
    ) -> None:
        say("connecting")
        client = connect(job.dest, self.policy, self.identity_file)
        try:
            sudo = "" if job.dest.user == "root" else "sudo -n "
            workdir = run_quiet(client, "mktemp -d /tmp/fleetbake-install.XXXXXXXX").strip()
            if not workdir.startswith("/tmp/fleetbake-install."):
                raise RemoteError(f"mktemp on the device gave {workdir!r}")
            try:
                files = {f"{workdir}/install.sh": (script, 0o700)}
                args = list(job.args)
                if job.token is not None:
                    files[f"{workdir}/token"] = (job.token.encode() + b"\n", 0o600)
                    args += ["--token-file", f"{workdir}/token"]
                say(f"uploading install.sh ({len(script) / 1e3:.0f} kB)")
                upload(client, files)
                lines: list[str] = []

                def on_line(line: str) -> None:
                    lines.append(line)
                    say(line)

                command = f"{sudo}sh {shlex.quote(workdir + '/install.sh')} {shlex.join(args)}"
                status = run_streaming(client, command, on_line)
            finally:
                _remove(client, workdir, say)
            if status != 0:
                raise RemoteError(_failure(status, lines))
            if "--uninstall" in job.args:
                outcome.status = "uninstalled"
            else:
                unchanged = any(NOTHING_TO_CHANGE in line for line in lines)
                outcome.status = "unchanged" if unchanged else "installed"
            if self.after is not None and outcome.status != "uninstalled":
                outcome.wait = self.after(Session(client, sudo, outcome))
        finally:
            client.close()


def _failure(status: int, lines: list[str]) -> str:
    """install.sh's own error line when it gave one, else the last line of output."""
    errors = [line for line in lines if "error:" in line or line.startswith("sudo:")]
    last = (errors or lines or ["(no output)"])[-1]
    return f"install.sh exited with {status}: {last}"


def _remove(client: paramiko.SSHClient, workdir: str, say: Callable[[str], None]) -> None:
    """Best effort: the upload holds the token; a lost connection must not hide why."""
    try:
        run_quiet(client, f"rm -rf {shlex.quote(workdir)}")
    except (RemoteError, OSError, paramiko.SSHException) as exc:
        say(f"warning: could not remove {workdir} on the device: {exc}")


def _prefixed(progress: Callable[[str], None], name: str) -> Callable[[str], None]:
    def say(text: str) -> None:
        progress(f"[{name}] {text}")

    return say


def summary_lines(outcomes: list[Outcome]) -> list[str]:
    """One line per device for stderr, failures with their reason."""
    width = max(len(str(o.dest)) for o in outcomes)
    lines = []
    for o in outcomes:
        what = o.status + (f", {o.wait}" if o.wait else "")
        node = f" node {o.node_id}" if o.node_id else ""
        reason = f": {o.error}" if o.error else ""
        lines.append(f"  {str(o.dest):<{width}}{node}: {what} ({o.elapsed_s:.0f} s){reason}")
    return lines
