"""The durable report spool and report delivery.

    run ends ─► spool/RUN.json (written, fsynced, renamed) ─► PUT /v1/runs/RUN/report
            ─► 200/201 ─► delivered/RUN.json (a small receipt) ─► spool/RUN.json removed

The spooled bytes are what is sent, on every attempt and after every restart, so the master
never sees two different reports for a run. A refusal (4xx other than 408/425/429) leaves
the report in the spool, to be sent again at the next start.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_any, stop_when_event_set
from tenacity.stop import stop_after_delay, stop_base, stop_never

from executor import jsontext
from executor.agent.master import Master, Refused, Transient, backoff
from executor.files import write_output
from executor.timefmt import now

log = logging.getLogger("executor.agent.delivery")


class Undelivered(Exception):
    """Delivery was given up (grace period over, or stopped); the report stays spooled."""


class Spool:
    """Reports in the state directory: `spool/` (pending) and `delivered/` (receipts)."""

    def __init__(self, state_dir: Path) -> None:
        self.pending_dir = state_dir / "spool"
        self.delivered_dir = state_dir / "delivered"

    def save(self, report: Mapping[str, Any]) -> Path:
        path = self.pending_dir / f"{report['run_id']}.json"
        write_output(path, jsontext.dumps(report).encode(), mode=0o600)
        return path

    def pending(self) -> list[Path]:
        """Pending reports, oldest first."""
        if not self.pending_dir.is_dir():
            return []
        return sorted(self.pending_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name))

    def status_of(self, run_id: str) -> str | None:
        """The run status of a pending or delivered report for `run_id`, or None."""
        for path in (self.pending_dir / f"{run_id}.json", self.delivered_dir / f"{run_id}.json"):
            try:
                status = json.loads(path.read_bytes())["status"]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                continue
            return str(status)
        return None

    def is_delivered(self, run_id: str) -> bool:
        return (self.delivered_dir / f"{run_id}.json").is_file()

    def acknowledge(self, path: Path, http_status: int) -> None:
        """Keep a receipt (run id, status, time), then drop the spooled report."""
        report = json.loads(path.read_bytes())
        receipt = {
            "run_id": report["run_id"],
            "status": report["status"],
            "http_status": http_status,
            "acknowledged_at": now(),
        }
        try:
            write_output(self.delivered_dir / path.name, json.dumps(receipt).encode(), 0o600)
        except OSError as exc:  # delivered all the same: only the receipt is missing
            log.error("no receipt kept for report %s: %s", path.stem, exc)
        path.unlink(missing_ok=True)


class Deliverer:
    def __init__(self, master: Master, spool: Spool, stop: threading.Event | None = None) -> None:
        self._master = master
        self._spool = spool
        self._stop = stop or threading.Event()

    def deliver(self, path: Path, give_up_after_s: float | None = None) -> int:
        """Send one spooled report until acknowledged; returns 200 or 201.

        Raises Refused (kept on disk) or Undelivered (time is up; kept on disk).
        """
        try:
            status = self.send(path.stem, path.read_bytes(), give_up_after_s)
        except Refused as exc:
            log.error("report %s refused by the master, kept in %s: %s", path.stem, path, exc)
            raise
        self._spool.acknowledge(path, status)
        return status

    def send(self, run_id: str, body: bytes, give_up_after_s: float | None = None) -> int:
        """Send one report until acknowledged; returns 200 or 201. Raises Refused or
        Undelivered."""
        deadline: stop_base = stop_never
        if give_up_after_s is not None:
            deadline = stop_after_delay(give_up_after_s)
        retrying = Retrying(
            retry=retry_if_exception_type(Transient),
            wait=backoff(give_up_after_s),
            stop=stop_any(deadline, stop_when_event_set(self._stop)),
            sleep=self._pause,
            before_sleep=lambda state: log.warning(
                "report %s not delivered yet (attempt %d): %s",
                run_id,
                state.attempt_number,
                state.outcome.exception() if state.outcome else "?",
            ),
        )
        started = time.monotonic()
        try:
            answer = retrying(self._master.request, "PUT", f"/v1/runs/{run_id}/report", body)
        except RetryError as exc:
            waited = time.monotonic() - started
            raise Undelivered(f"report {run_id} not delivered after {waited:.0f} s") from exc
        log.info("report %s delivered (%d)", run_id, answer.status)
        return answer.status

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)
