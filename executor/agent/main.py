"""`executor agent`: the lifecycle of a node's run (docs/reference/cli-exit-codes.md).

    config ─► EXECUTOR-STATUS starting ─► heartbeats (thread)
           ─► report already in the state dir? ──yes──────────────────────┐
           ─► pipeline (path / gateway) ─► sha256 ─► engine.run ─► spool ─┤
           ─► deliver pending reports, oldest first ◄─────────────────────┘
           ─► last heartbeat ─► EXECUTOR-STATUS <end state> ─► poweroff?

Exit codes (EXECUTOR_ON_COMPLETE=none, once the report is acknowledged): 0 succeeded,
1 failed or cancelled, 2 configuration error / invalid pipeline / sha256 mismatch,
3 report refused by the server (kept on disk) or given up after the poweroff grace period,
4 the state directory could not be written (full or read-only disk): the report was
  delivered from memory, with its log marked truncated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from executor import jsontext
from executor.agent.config import AgentConfig, AgentConfigError, load_config
from executor.agent.delivery import Deliverer, Spool, Undelivered
from executor.agent.heartbeat import Heartbeats
from executor.agent.master import Master, Refused
from executor.agent.reportlog import fit_report, log_for_report
from executor.agent.secret import TOKEN, make_undumpable, take_token
from executor.engine.combined_log import CombinedLog, truncation
from executor.files import write_output
from executor.timefmt import now

log = logging.getLogger("executor.agent")

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_UNDELIVERED, EXIT_STATE_LOST = 0, 1, 2, 3, 4
STATUS_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_FAILED}
OUTCOME_FILE = "outcome.json"


def status_line(node_id: str, run_id: str, state: str) -> None:
    """The console line a boot test follows: exactly one at start, one at the end."""
    print(f"EXECUTOR-STATUS node={node_id} run={run_id} state={state}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.debug else logging.INFO,
        format="executor-agent: %(levelname)s %(message)s",
    )
    env = {**os.environ, **_overrides(args)}
    token = take_token()
    if token is not None:
        env[TOKEN] = token  # in memory only, never in any environment again
    make_undumpable()
    try:
        config = load_config(env)
    except AgentConfigError as exc:
        node = _printable(env.get("EXECUTOR_NODE_ID") or socket.gethostname())
        run = _printable(env.get("EXECUTOR_RUN_ID") or "-")
        status_line(node, run, "starting")
        print(f"executor agent: error: {exc}", file=sys.stderr)
        status_line(node, run, "invalid")
        return EXIT_INVALID
    status_line(config.run.node_id, config.run.run_id, "starting")
    code, state = Agent(config).run()
    status_line(config.run.node_id, config.run.run_id, state)
    if config.on_complete == "poweroff":
        power_off(config)
    return code


def _printable(value: str) -> str:
    """An id for the status line even when it is invalid: no spaces, bounded length."""
    return "".join(c if c.isalnum() or c in "_.-" else "?" for c in value)[:128] or "-"


def power_off(config: AgentConfig) -> None:
    log.info("powering off: %s", " ".join(config.poweroff_command))
    try:
        subprocess.run(config.poweroff_command, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("poweroff command failed: %s", exc)


class NotRun(Exception):
    """The pipeline could not be obtained or loaded: the run ends `invalid`."""


class GaveUp(Exception):
    """The gateway did not answer within the poweroff grace period: the run ends `failed`."""


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.spool = Spool(config.run.state_dir)
        self.master: Master | None = None
        self.beats: Heartbeats | None = None
        self.unwritten: list[str] = []
        """What could not be written to the state directory (full disk, read-only)."""
        self.unspooled: bytes | None = None
        """This run's report, when the spool could not keep it: delivered from memory."""
        self.delivery_grace_s = config.master_patience_s
        """How long delivery may take before the node powers off anyway; None: no limit."""
        if config.master_url is not None and config.token is not None:
            self.master = Master(
                config.master_url,
                config.token,
                config.run.node_id,
                ca_pem=config.master_ca,
                client_cert=config.client_cert,
            )
            self.beats = Heartbeats(self.master, config.run.run_id, config.heartbeat_s)

    def run(self) -> tuple[int, str]:
        """Run (or resume) this node's run; returns (exit code, end state)."""
        if self.beats is not None:
            self.beats.start()
        code, state = EXIT_FAILED, "failed"
        try:
            code, state = self._previous_outcome() or self._produce_report()
            if self.master is not None:
                code, state = self._deliver_all(code, state)
            if self.unwritten and code in (EXIT_OK, EXIT_FAILED):
                code = EXIT_STATE_LOST
        finally:  # the master hears the end, whatever broke
            if self.beats is not None:
                self.beats.stop(final_state="done" if code == EXIT_OK else "failed")
        return code, state

    # -- producing the report -----------------------------------------------------------------

    def _previous_outcome(self) -> tuple[int, str] | None:
        """A report for this run id already exists (pending or delivered): do not run again."""
        status = self.spool.status_of(self.config.run.run_id)
        try:
            outcome = json.loads((self.config.run_dir / OUTCOME_FILE).read_text())
            code, state = int(outcome["exit"]), str(outcome["state"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            if status is None:
                return None
            code, state = STATUS_EXIT.get(status, EXIT_FAILED), status
        log.info(
            "run %s already has a report (%s): not running it again", self.config.run.run_id, state
        )
        return code, state

    def _produce_report(self) -> tuple[int, str]:
        config = self.config
        log_path = config.run_dir / "combined.log"
        try:
            results = self._pipeline_results(log_path)
            code, state = STATUS_EXIT.get(results["status"], EXIT_FAILED), results["status"]
            self._keep("results.json", json.dumps(results).encode())
        except NotRun as exc:
            reason = f"pipeline not run: {exc}"
            log.error("%s", reason)
            results, code, state = self._not_run(log_path, reason), EXIT_INVALID, "invalid"
        except GaveUp as exc:
            reason = f"pipeline not run: {exc}"
            log.error("%s", reason)
            results, code, state = self._not_run(log_path, reason), EXIT_FAILED, "failed"
            self.delivery_grace_s = 0.0  # the master had its grace period: one try, then off
        except Exception:  # still report: the master must hear of a node whose run broke
            reason = f"run failed in the agent:\n{traceback.format_exc()}"
            log.error("%s", reason)
            results, code, state = self._not_run(log_path, reason), EXIT_FAILED, "failed"
        if (why := truncation(log_path)) is not None:  # the run went on without its log
            self.unwritten.append(f"the combined log: {why}")
        if self.beats is not None:
            self.beats.update(state="reporting")
        report = self._report(results, log_path)
        status = results["status"]  # standalone: results.json on the node is the record
        if self.master is not None:
            status = report["status"]
            if status != results["status"]:  # its results did not fit: left out
                code, state = EXIT_FAILED, "failed"
            try:
                self.spool.save(report)  # durable before the first send attempt
            except OSError as exc:
                self._unwritable("the report spool", exc)
                self.unspooled = jsontext.dumps(report).encode()
        outcome = {"exit": code, "state": state, "status": status}
        self._keep(OUTCOME_FILE, json.dumps(outcome).encode())
        return code, state

    def _pipeline_results(self, log_path: Path) -> dict[str, Any]:
        """Obtain the pipeline and run it; NotRun when it cannot run at all."""
        # Imported only now, once the heartbeats have started: the engine and the pipeline
        # loader take about a second to import on an emulated CPU, and the master hears of
        # the node meanwhile. An image that cannot import them still reports (the caller).
        from executor.agent.gateway import NotDownloaded, Sha256Mismatch, obtain_pipeline
        from executor.agent.runner import run_pipeline
        from executor.pipeline import PipelineError

        try:
            pipeline = obtain_pipeline(self.config, self.master)
            if self.beats is not None:
                self.beats.update(state="running")
            return run_pipeline(self.config, pipeline, log_path, self._progress)
        except (Sha256Mismatch, Refused, FileNotFoundError, PipelineError) as exc:
            raise NotRun(str(exc)) from exc
        except NotDownloaded as exc:
            raise GaveUp(str(exc)) from exc

    def _keep(self, name: str, data: bytes) -> None:
        """Write a state file of this run; a failure is noted, not fatal."""
        try:
            write_output(self.config.run_dir / name, data, mode=0o600)
        except OSError as exc:
            self._unwritable(name, exc)

    def _unwritable(self, what: str, exc: OSError) -> None:
        log.error("cannot write %s in the state directory: %s", what, exc)
        self.unwritten.append(f"{what}: {exc.strerror or exc}")

    def _report(self, results: dict[str, Any], log_path: Path) -> dict[str, Any]:
        """Results and combined log, the log marked truncated if the state directory failed,
        the whole within the server's body limit (reportlog.py)."""
        try:
            text = log_for_report(log_path)
        except OSError as exc:
            text = ""
            self._unwritable("the combined log", exc)
        marks = "".join(
            f"{now()} executor err [the combined log is truncated: cannot write {what}]\n"
            for what in self.unwritten
        )

        def recut(limit: int) -> str:
            try:
                return log_for_report(log_path, limit) + marks
            except OSError:
                return marks

        return fit_report(results, text + marks, recut)

    def _progress(self, done: int, total: int) -> None:
        if self.beats is not None:
            self.beats.update(done=done, total=total)

    def _not_run(self, log_path: Path, reason: str) -> dict[str, Any]:
        """The report of a run that never started: status failed, no tasks, reason in log."""
        try:  # (opening can fail: a read-only or full state disk; writes never raise)
            with CombinedLog(log_path) as combined:
                combined.executor(reason, stream="err")
        except OSError as exc:
            self._unwritable("the combined log", exc)
        stamp = now()
        results: dict[str, Any] = {
            "run_id": self.config.run.run_id,
            "node_id": self.config.run.node_id,
            "pipeline": self.config.gateway_name or Path(self.config.pipeline).name,
            "status": "failed",
            "started_at": stamp,
            "finished_at": stamp,
            "tasks": {},
            "log_path": str(log_path),
        }
        self._keep("results.json", json.dumps(results).encode())
        return results

    # -- delivery -------------------------------------------------------------------------------

    def _deliver_all(self, code: int, state: str) -> tuple[int, str]:
        """Deliver every pending report, older runs first; the result for this run decides."""
        assert self.master is not None
        deliverer = Deliverer(self.master, self.spool)
        grace = self.delivery_grace_s
        deadline = None if grace is None else time.monotonic() + grace
        mine = f"{self.config.run.run_id}.json"
        pending = sorted(self.spool.pending(), key=lambda p: p.name == mine)
        for path in pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                deliverer.deliver(path, give_up_after_s=left)
            except Refused as exc:
                if path.name == mine:
                    log.error("report kept in %s; fix the cause and restart the agent", path)
                    return EXIT_UNDELIVERED, f"refused-{exc.status}"
            except Undelivered as exc:
                log.error("%s; kept in %s for the next start", exc, path)
                if path.name == mine:
                    return EXIT_UNDELIVERED, "undelivered"
        if self.unspooled is not None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                deliverer.send(self.config.run.run_id, self.unspooled, give_up_after_s=left)
            except Refused as exc:
                log.error("report refused and lost (the spool could not keep it): %s", exc)
                return EXIT_UNDELIVERED, f"refused-{exc.status}"
            except Undelivered as exc:
                log.error("%s; lost: the spool could not keep it", exc)
                return EXIT_UNDELIVERED, "undelivered"
        return code, state


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="executor agent",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Service mode inside images: get the pipeline (baked path or gateway), "
        "send heartbeats, run it, and deliver the report durably. Configured by EXECUTOR_* "
        "environment variables; the options below override them.",
        epilog=EPILOG,
    )
    for option, variable in OPTION_VARIABLES.items():
        parser.add_argument(f"--{option}", metavar="VALUE", help=f"overrides {variable}")
    parser.add_argument("--debug", action="store_true", help="log every request")
    return parser


EPILOG = """\
environment:
  EXECUTOR_PIPELINE          directory or .tar.gz path, or gateway:NAME (required)
  EXECUTOR_PIPELINE_SHA256   expected sha256 of the .tar.gz or gateway download
  EXECUTOR_NODE_ID           default: the host name
  EXECUTOR_RUN_ID            default: a UUID generated once, kept in the state directory
  EXECUTOR_MASTER_URL        core services URL; unset: standalone, nothing is reported
  EXECUTOR_TOKEN             this node's bearer token (with EXECUTOR_MASTER_URL)
  EXECUTOR_MASTER_CA         CA certificates (path or PEM) an https:// master must chain to
  EXECUTOR_INSECURE          1 allows plain http:// to a non-loopback master (logged)
  EXECUTOR_MASTER_CLIENT_CERT, EXECUTOR_MASTER_CLIENT_KEY  client certificate (mutual TLS)
  EXECUTOR_WORKERS           default: the CPU count
  EXECUTOR_HEARTBEAT_S       seconds between heartbeats (+-20% jitter), default 10
  EXECUTOR_STATE_DIR         default /var/lib/executor (else ~/.local/state/executor)
  EXECUTOR_ON_COMPLETE       none (default) or poweroff
  EXECUTOR_POWEROFF_GRACE_S  with poweroff: give up delivering after this, default 600
  EXECUTOR_POWEROFF_COMMAND  default "systemctl poweroff" (tests set a harmless one)

console: one line at start and one at the end,
  EXECUTOR-STATUS node=<id> run=<id> state=<state>

exit codes: 0 succeeded, 1 failed or cancelled, 2 configuration error, invalid
pipeline or sha256 mismatch, 3 report refused (kept on disk) or not delivered in time,
4 the state directory could not be written (full disk?): the report was delivered from
memory, its log marked truncated.
"""

OPTION_VARIABLES: Mapping[str, str] = {
    "pipeline": "EXECUTOR_PIPELINE",
    "node-id": "EXECUTOR_NODE_ID",
    "run-id": "EXECUTOR_RUN_ID",
    "master-url": "EXECUTOR_MASTER_URL",
    "workers": "EXECUTOR_WORKERS",
    "state-dir": "EXECUTOR_STATE_DIR",
}


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    values = {v: getattr(args, o.replace("-", "_")) for o, v in OPTION_VARIABLES.items()}
    return {k: v for k, v in values.items() if v is not None}
