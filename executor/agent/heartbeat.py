"""Heartbeats from their own thread.

The run only calls `update()` (a lock held for a few assignments), so a slow or absent
master never blocks or slows the scheduler. Every `interval_s` (+-20% jitter, so a fleet
booted together does not beat in step) the thread sends the current state, and at once when
the state changes, so the master sees even a short `running` phase. A failed beat is
retried with tenacity (exponential backoff, full jitter, 200 ms to 60 s), each attempt
carrying the state of that moment; a refused beat (4xx) waits for the next interval.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from typing import Any

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_when_event_set

from executor.agent.master import Master, Refused, Transient, backoff
from executor.timefmt import now

log = logging.getLogger("executor.agent.heartbeat")

STATES = ("starting", "running", "reporting", "done", "failed")


class Heartbeats:
    def __init__(self, master: Master, run_id: str, interval_s: float) -> None:
        self._master = master
        self._run_id = run_id
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._state = "starting"
        self._done = 0
        self._total = 0
        self._seq = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeats", daemon=True)
        self.sent = 0
        """Heartbeats the master accepted (for logs and tests)."""

    def start(self) -> None:
        self._thread.start()

    def update(
        self, state: str | None = None, done: int | None = None, total: int | None = None
    ) -> None:
        """Record the current state and progress; sent with the next beat."""
        with self._lock:
            if state is not None:
                assert state in STATES, state
                if state != self._state:
                    self._state = state
                    self._wake.set()
            if done is not None:
                self._done = done
            if total is not None:
                self._total = total

    def stop(self, final_state: str | None = None, timeout_s: float = 5.0) -> None:
        """Stop the thread; then send one last beat with `final_state` (one attempt)."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        if final_state is not None:
            self.update(state=final_state)
            try:
                self._send(timeout_s)
            except (Transient, Refused) as exc:
                log.warning("last heartbeat not delivered: %s", exc)

    def next_delay(self) -> float:
        return self.interval_s * random.uniform(0.8, 1.2)

    def body(self) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            return {
                "run_id": self._run_id,
                "seq": self._seq,
                "state": self._state,
                "tasks_done": self._done,
                "tasks_total": self._total,
                "interval_s": self.interval_s,
                "sent_at": now(),
            }

    def _send(self, timeout_s: float) -> None:
        payload = json.dumps(self.body()).encode()
        path = f"/v1/nodes/{self._master.node_id}/heartbeats"
        self._master.request("POST", path, payload, timeout_s=timeout_s)
        self.sent += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._beat()
            self._wake.wait(self.next_delay())

    def _pause(self, seconds: float) -> None:
        self._stop.wait(seconds)

    def _beat(self) -> None:
        retrying = Retrying(
            retry=retry_if_exception_type(Transient),
            wait=backoff(),
            stop=stop_when_event_set(self._stop),
            sleep=self._pause,
            reraise=False,
        )
        timeout = min(10.0, max(1.0, self.interval_s))
        try:
            retrying(self._send, timeout)
        except RetryError as exc:
            log.debug("heartbeats stopped while the master was unreachable: %s", exc)
        except Refused as exc:
            log.warning("heartbeat refused by the master: %s", exc)
