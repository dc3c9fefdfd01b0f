"""The builder's loop: claim a build, bake it, upload it, report it; forever.

    master                          builder                         bake (child)
      | <-- claim (long poll) ------- |
      | --- job (lease starts) -----> |
      | <-- GET pipeline ------------ |
      |                               | --- python -m imagefactory bake --> |
      | <-- heartbeat: stage, log --- |  <------ stage lines on stderr ---- |
      | --- cancel? ----------------> | --- SIGINT (then SIGKILL) --------> |
      | <-- uploads (chunks) -------- |  <------ --json summary ----------- |
      | <-- finish ------------------ |

While the master cannot be reached the bake goes on and the builder keeps trying (the
log lines wait); uploads and the finish are retried until they go through. Once the
master answers that the lease is lost, the bake is stopped and nothing is uploaded.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imagefactory.builder.bakeproc import BakeProcess, bake_argv
from imagefactory.builder.master import LeaseLost, MasterClient, Refused, Unreachable
from imagefactory.builder.push import push_oci, repository_name
from imagefactory.builder.upload import sha256_digest, upload
from imagefactory.stages import BAKE_STOP_S

T = TypeVar("T")
MAX_BACKOFF_S = 10.0
MAX_LOG_BATCH = 4096
TAIL_LINES = 20
MAX_ERROR = 16000
"""The end of a failure report kept: the master takes up to 16384 characters."""


@dataclass(frozen=True)
class BuilderConfig:
    builder_id: str
    work_dir: Path
    targets: tuple[str, ...]
    """What this host can build (imagefactory doctor's checks)."""
    formats: tuple[str, ...]
    """The formats `imagefactory bake` knows."""
    grace_s: float = BAKE_STOP_S
    """After a cancel's SIGINT, how long the bake may clean up before SIGKILL."""
    wait_s: float = 20.0
    """Long-poll length of one claim."""
    ca_file: Path | None = None
    """The builder's --ca-file: also what an https registry is verified against."""
    insecure: bool = False
    """The builder's --insecure: also allows a plain-HTTP registry beyond loopback."""


def say(text: str) -> None:
    print(f"builder: {text}", file=sys.stderr, flush=True)


def retrying(what: str, call: Callable[[], T]) -> T:
    """`call()` until the master answers (LeaseLost and Refused propagate)."""
    delay = 0.5
    failing = False
    while True:
        try:
            result = call()
        except Unreachable as exc:
            if not failing:
                say(f"{what}: master unreachable ({exc}); retrying")
                failing = True
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)
            continue
        if failing:
            say(f"{what}: master reachable again")
        return result


class Worker:
    def __init__(self, config: BuilderConfig, master: MasterClient) -> None:
        self.config = config
        self.master = master

    def run_forever(self) -> None:
        say(
            f"{self.config.builder_id} builds {', '.join(self.config.targets) or 'no target'}"
            f" as {', '.join(self.config.formats)}; master {self.master.url}"
        )
        while True:
            self.run_once()

    def run_once(self) -> bool:
        """Wait for one job (one long poll) and build it; False if none came."""
        targets, formats = list(self.config.targets), list(self.config.formats)
        job = retrying("claim", lambda: self.master.claim(targets, formats, self.config.wait_s))
        if job is None:
            return False
        Job(self, job).run()
        return True


class Job:
    """One attempt at one build."""

    def __init__(self, worker: Worker, job: dict[str, Any]) -> None:
        self.master = worker.master
        self.config = worker.config
        self.build = job["build"]
        self.id: str = self.build["build_id"]
        self.attempt: int = self.build["attempt"]
        self.lease_s = float(job["lease_s"])
        self.registry: str | None = job["registry"]
        self.dir = self.config.work_dir / f"{self.id}.{self.attempt}"

    def run(self) -> None:
        b = self.build
        say(f"build {self.id} attempt {self.attempt}: {b['target']} {b['format']} {b['pipeline']}")
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            try:
                outcome = self._bake()
            except (LeaseLost, KeyboardInterrupt):
                raise
            except Exception as exc:  # a failed step fails this build, not the builder
                say(f"build {self.id}: {type(exc).__name__}: {exc}")
                outcome = {"state": "failed", "error": f"builder: {type(exc).__name__}: {exc}"}
            self._report(outcome)
        except LeaseLost:
            say(f"build {self.id}: lease lost; dropped")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _bake(self) -> dict[str, Any]:
        """Bake and upload: the outcome to report."""
        pipeline = self.dir / "pipeline.tar.gz"
        pipeline.write_bytes(
            retrying("pipeline", lambda: self.master.pipeline(self.id, self.attempt))
        )
        argv = bake_argv(self.build["target"], self.build["format"], pipeline, self.dir / "out")
        bake = BakeProcess(argv, self.dir / "bake.log")
        try:
            code, cancelled = self._watch(bake)
        except BaseException:
            bake.interrupt(self.config.grace_s)
            raise
        finally:
            bake.close()
        if cancelled:
            return {"state": "cancelled", "stages": bake.stage_times(), "error": "cancelled"}
        if code != 0:
            self._flush(bake)
            tail = (self.dir / "bake.log").read_text(errors="replace").splitlines()[-TAIL_LINES:]
            error = f"bake exited with {code}:\n" + "\n".join(tail)
            return {"state": "failed", "stages": bake.stage_times(), "error": error}
        delivered = self._deliver(bake.summary(), bake.stage_times())
        self._flush(bake)
        return {"state": "succeeded", "stages": bake.stage_times(), **delivered}

    def _interval(self) -> float:
        return max(0.5, min(self.lease_s / 4, 5.0))

    def _watch(self, bake: BakeProcess) -> tuple[int, bool]:
        """Heartbeats until the bake ends: (its exit code, whether it was cancelled)."""
        while True:
            code = bake.wait(self._interval())
            if self._heartbeat(bake) and code is None:
                say(f"build {self.id}: cancelled; interrupting the bake")
                renew = functools.partial(self._renew, bake)
                return bake.interrupt(self.config.grace_s, renew, self._interval()), True
            if code is not None:
                return code, False

    def _flush(self, bake: BakeProcess) -> None:
        """Send the bake's last log lines (and renew the lease for the uploads): retried
        until the master answers, so that a restarted master gets the whole log."""
        delay = 0.5
        while self._heartbeat(bake) is None:
            time.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    def _heartbeat(self, bake: BakeProcess) -> bool | None:
        """Send progress; True if cancelled, None if the master is unreachable."""
        try:
            return self._send_progress(bake)
        except LeaseLost:
            say(f"build {self.id}: lease lost; stopping the bake")
            bake.interrupt(self.config.grace_s)
            raise

    def _renew(self, bake: BakeProcess) -> None:
        """A heartbeat while a cancelled bake stops: an expired lease would end the build
        "the builder went silent" and lose its last log lines. A lost lease changes
        nothing now: the bake is stopping anyway."""
        with contextlib.suppress(LeaseLost):
            self._send_progress(bake)

    def _send_progress(self, bake: BakeProcess) -> bool | None:
        """One heartbeat with the bake's progress: True if cancelled, None if the master
        is unreachable (the log lines go again next time). Raises LeaseLost."""
        stage, stages, lines = bake.take()
        sent, rest = lines[:MAX_LOG_BATCH], lines[MAX_LOG_BATCH:]
        progress = {"stage": stage, "stages": stages, "log": sent}
        try:
            cancel = self.master.heartbeat(self.id, self.attempt, progress)
        except Unreachable:
            bake.give_back(lines)
            return None
        bake.give_back(rest)
        return cancel

    @contextmanager
    def _lease_kept(self, stage: str, stages: dict[str, float]) -> Iterator[None]:
        """Heartbeats from a thread while the body runs (a push may outlast the lease);
        raises LeaseLost afterwards if the master said the lease was gone."""
        stop = threading.Event()
        lost: list[LeaseLost] = []
        progress = {"stage": stage, "stages": stages, "log": []}

        def beat() -> None:
            while not stop.wait(self._interval()):
                try:
                    self.master.heartbeat(self.id, self.attempt, progress)
                except Unreachable:
                    continue  # the next beat tries again
                except LeaseLost as exc:
                    lost.append(exc)
                    return

        thread = threading.Thread(target=beat, name=f"lease-{self.id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
        if lost:
            say(f"build {self.id}: lease lost during {stage}")
            raise lost[0]

    def _deliver(self, summary: dict[str, Any], stages: dict[str, float]) -> dict[str, Any]:
        """Upload the baked image (and push an OCI one): the artifacts part of the outcome."""
        [image] = summary["images"]
        path = Path(image["image"])
        digest = sha256_digest(path)
        say(f"build {self.id}: uploading {path.name} ({path.stat().st_size} bytes, {digest})")
        retrying("upload", lambda: upload(self.master, self.id, self.attempt, path, digest))
        outcome: dict[str, Any] = {
            "artifacts": [{"name": path.name, "digest": digest, "size": path.stat().st_size}]
        }
        if self.build["format"] == "oci" and self.registry:
            reference = f"fleetbake/{repository_name(self.build['pipeline'])}:{self.id}"
            with self._lease_kept("push", stages):
                outcome["pushed"] = push_oci(
                    Path(image["dir"]),
                    self.registry,
                    reference,
                    self.config.ca_file,
                    self.config.insecure,
                )
        return outcome

    def _report(self, outcome: dict[str, Any]) -> None:
        if outcome.get("error"):
            outcome = {**outcome, "error": outcome["error"][-MAX_ERROR:]}
        try:
            done = retrying("finish", lambda: self.master.finish(self.id, self.attempt, outcome))
        except Refused as exc:
            if outcome["state"] == "failed":
                say(f"build {self.id}: the master refused the failure report: {exc}")
                return
            failed = {"state": "failed", "error": f"the master refused the result: {exc}"}
            self._report(failed)
            return
        say(f"build {self.id}: {done['state']}")
