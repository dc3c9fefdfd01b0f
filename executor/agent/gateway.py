"""Getting the pipeline: a baked path, or `GET /v1/pipelines/NAME` from the gateway, and the
EXECUTOR_PIPELINE_SHA256 check of a `.tar.gz` or a download."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tenacity import Retrying, retry_if_exception_type
from tenacity.stop import stop_after_delay, stop_base, stop_never

from executor.agent.config import GATEWAY_PREFIX, AgentConfig
from executor.agent.master import Master, TooLarge, Transient, backoff
from executor.files import output_file
from executor.pipeline import PipelineError

log = logging.getLogger("executor.agent.gateway")


class Sha256Mismatch(Exception):
    """The pipeline's sha256 is not EXECUTOR_PIPELINE_SHA256; str() says both."""


class NotDownloaded(Exception):
    """The gateway download was given up at the poweroff grace period; str() says why."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(
    master: Master, name: str, target: Path, max_bytes: int, give_up_after_s: float | None = None
) -> Path:
    """Fetch pipeline `name` into `target`, retrying transient failures with backoff.

    The body streams to disk, hashed as it arrives, and replaces `target` only when it
    matches the X-Pipeline-SHA256 header (a mismatch is a broken transfer: transient).
    Raises Refused for a 4xx (unknown pipeline, bad token), PipelineError for a download
    over `max_bytes` (EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES), and the last Transient once
    `give_up_after_s` have passed (None: retry until the master answers).
    """
    where = f"{GATEWAY_PREFIX}{name}"
    stop: stop_base = stop_never
    patience = "retrying until the master answers"
    if give_up_after_s is not None:
        stop = stop_after_delay(give_up_after_s)
        patience = f"giving up {give_up_after_s:g} s after the first attempt"

    def fetch() -> None:
        with output_file(target, mode=0o600) as out:
            headers, actual = master.download(
                f"/v1/pipelines/{name}", out, max_bytes, timeout_s=120
            )
            if actual != headers.get("x-pipeline-sha256", "").lower():
                raise Transient(f"pipeline {name}: body does not match X-Pipeline-SHA256")

    retrying = Retrying(
        retry=retry_if_exception_type(Transient),
        wait=backoff(give_up_after_s),
        stop=stop,
        reraise=True,
        before_sleep=lambda state: log.warning(
            "pipeline %s not downloaded yet (attempt %d), %s: %s",
            name,
            state.attempt_number,
            patience,
            state.outcome.exception() if state.outcome else "?",
        ),
    )
    try:
        retrying(fetch)
    except TooLarge as exc:
        raise PipelineError(where, f"{exc} (EXECUTOR_PIPELINE_MAX_DOWNLOAD_BYTES)") from None
    return target


def obtain_pipeline(config: AgentConfig, master: Master | None) -> Path:
    """The local path of the pipeline to run, checked against EXECUTOR_PIPELINE_SHA256.

    Raises Sha256Mismatch, Refused (gateway), FileNotFoundError, or NotDownloaded: with
    EXECUTOR_ON_COMPLETE=poweroff an ephemeral node waits for the gateway no longer than
    EXECUTOR_POWEROFF_GRACE_S, as for the report's delivery.
    """
    name = config.gateway_name
    if name is not None:
        assert master is not None, "config requires a master URL for gateway pipelines"
        limit = config.archive_limits.max_download_bytes
        grace = config.master_patience_s
        try:
            path = download(master, name, config.run_dir / f"{name}.tar.gz", limit, grace)
        except Transient as exc:  # only with a grace period: time is up
            raise NotDownloaded(
                f"pipeline {name} not downloaded within EXECUTOR_POWEROFF_GRACE_S "
                f"({grace:g} s): {exc}"
            ) from None
    else:
        path = Path(config.pipeline)
        if not path.exists():
            raise FileNotFoundError(f"EXECUTOR_PIPELINE: {path} does not exist")
    if config.pipeline_sha256 is not None:
        if path.is_dir():
            log.warning("EXECUTOR_PIPELINE_SHA256 ignored: %s is a directory", path)
            return path
        actual = sha256_of(path)
        if actual != config.pipeline_sha256:
            raise Sha256Mismatch(
                f"pipeline {config.pipeline}: sha256 is {actual}, "
                f"EXECUTOR_PIPELINE_SHA256 expects {config.pipeline_sha256}"
            )
    return path
