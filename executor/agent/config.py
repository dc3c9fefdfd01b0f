"""The agent's settings: the EXECUTOR_* environment (docs/reference/environment.md), checked all at
once into a frozen AgentConfig. Any problem is an AgentConfigError with one clear line."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shlex
import ssl
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from executor import settings
from executor.archive import ArchiveLimits
from executor.files import write_output
from executor.settings import RunSettings, SettingsError

GATEWAY_PREFIX = "gateway:"
PEM_BEGIN = "-----BEGIN CERTIFICATE-----"
_PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)
RUN_ID_FILE = "run-id"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[!-~]+")
_TOKEN_RULE = (
    "the token must be printable ASCII without spaces (it goes into an HTTP header): "
    "no line break, control or non-ASCII character"
)
MASTER_URL = re.compile(r"https?://[^\s/]+(/\S*)?")
"""What EXECUTOR_MASTER_URL must look like (tools that write node.env check it too)."""
log = logging.getLogger("executor.agent.config")


class AgentConfigError(ValueError):
    """A missing or invalid EXECUTOR_* variable; str() is one line."""


@dataclass(frozen=True)
class AgentConfig:
    run: RunSettings
    """The run's identity and resources, as for `executor run`, except that an unset
    EXECUTOR_RUN_ID is a UUID generated once and kept in the state directory (so a
    restarted agent goes on with the same run). The state directory also holds run logs,
    results and the report spool."""
    pipeline: str
    """EXECUTOR_PIPELINE: a directory or .tar.gz path, or `gateway:NAME`."""
    pipeline_sha256: str | None
    """EXECUTOR_PIPELINE_SHA256: expected sha256 of the .tar.gz or the gateway download."""
    master_url: str | None
    """EXECUTOR_MASTER_URL; unset means standalone: no heartbeats, no report delivery."""
    master_ca: str | None
    """EXECUTOR_MASTER_CA (a file, or the PEM text itself): the CA certificates an https://
    master's certificate must chain to; None trusts the system's CAs."""
    client_cert: tuple[str, str] | None
    """EXECUTOR_MASTER_CLIENT_CERT and _KEY: files shown to a master that requires a client
    certificate (mutual TLS)."""
    insecure: bool
    """EXECUTOR_INSECURE=1: allow a plain http:// master on a non-loopback address."""
    token: str | None
    """EXECUTOR_TOKEN, else the contents of EXECUTOR_TOKEN_FILE: this node's bearer token
    (required with a master URL)."""
    heartbeat_s: float
    """EXECUTOR_HEARTBEAT_S: seconds between heartbeats (each jittered by +-20%)."""
    on_complete: Literal["none", "poweroff"]
    """EXECUTOR_ON_COMPLETE: `poweroff` powers the node off once the report is delivered."""
    poweroff_grace_s: float
    """EXECUTOR_POWEROFF_GRACE_S: with poweroff, give up delivering after this long (the
    report stays spooled for the next boot) and power off anyway. Default 600."""
    poweroff_command: tuple[str, ...]
    """EXECUTOR_POWEROFF_COMMAND: what "power off" runs (default `systemctl poweroff`).
    Tests set it to a harmless command so that they never power off the host."""
    archive_limits: ArchiveLimits
    """EXECUTOR_PIPELINE_MAX_BYTES, _MAX_FILES, _MAX_DOWNLOAD_BYTES: how big a pipeline
    archive may be, unpacked and as downloaded."""

    @property
    def gateway_name(self) -> str | None:
        if self.pipeline.startswith(GATEWAY_PREFIX):
            return self.pipeline[len(GATEWAY_PREFIX) :]
        return None

    @property
    def master_patience_s(self) -> float | None:
        """How long the node waits on its master (download, delivery) before it powers off
        anyway: the poweroff grace period with poweroff, else None (no limit)."""
        return self.poweroff_grace_s if self.on_complete == "poweroff" else None

    @property
    def run_dir(self) -> Path:
        return self.run.state_dir / "runs" / self.run.run_id


def load_config(env: Mapping[str, str] = os.environ) -> AgentConfig:
    """Read and check the environment; raises AgentConfigError."""
    try:
        return _load(env)
    except SettingsError as exc:
        raise AgentConfigError(str(exc)) from None


def _load(env: Mapping[str, str]) -> AgentConfig:
    node_id = settings.node_id(env)
    workers = settings.workers(env)
    settings.fastpaths(env)  # a bad value is a configuration error at start, not a failed run
    state_dir = settings.state_dir(env)
    master_url = _master_url(env)
    insecure = _insecure(env, master_url)
    master_ca = _master_ca(env, master_url)
    client_cert = _client_cert(env)
    token = _token(env)
    if master_url and not token:
        raise AgentConfigError(
            "EXECUTOR_TOKEN is required when EXECUTOR_MASTER_URL is set (or EXECUTOR_TOKEN_FILE)"
        )
    pipeline = env.get("EXECUTOR_PIPELINE", "").strip()
    if not pipeline:
        raise AgentConfigError("EXECUTOR_PIPELINE is required (a path or gateway:NAME)")
    if pipeline.startswith(GATEWAY_PREFIX):
        settings.check_id("EXECUTOR_PIPELINE", pipeline[len(GATEWAY_PREFIX) :])
        if not master_url:
            raise AgentConfigError(f"EXECUTOR_PIPELINE={pipeline} needs EXECUTOR_MASTER_URL")
    return AgentConfig(
        run=RunSettings(
            node_id=node_id, run_id=_run_id(env, state_dir), workers=workers, state_dir=state_dir
        ),
        pipeline=pipeline,
        pipeline_sha256=_sha256(env),
        master_url=master_url,
        master_ca=master_ca,
        client_cert=client_cert,
        insecure=insecure,
        token=token,
        heartbeat_s=_seconds(env, "EXECUTOR_HEARTBEAT_S", 10.0),
        on_complete=_on_complete(env),
        poweroff_grace_s=_seconds(env, "EXECUTOR_POWEROFF_GRACE_S", 600.0),
        poweroff_command=_command(env),
        archive_limits=_archive_limits(env),
    )


def _master_url(env: Mapping[str, str]) -> str | None:
    url = env.get("EXECUTOR_MASTER_URL", "").strip()
    if not url:
        return None
    if not MASTER_URL.fullmatch(url):
        raise AgentConfigError(f"EXECUTOR_MASTER_URL: {url!r} is not an http(s):// URL")
    return url.rstrip("/")


def is_loopback(url: str) -> bool:
    """Whether the URL's host is this machine's loopback (localhost, 127/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _insecure(env: Mapping[str, str], master_url: str | None) -> bool:
    """A plain http:// master beyond loopback needs EXECUTOR_INSECURE=1: the token would
    cross the network readable by anyone on the path."""
    raw = env.get("EXECUTOR_INSECURE", "").strip()
    if raw not in ("", "0", "1"):
        raise AgentConfigError(f"EXECUTOR_INSECURE: {raw!r} is not 0 or 1")
    insecure = raw == "1"
    if master_url is None or not master_url.startswith("http://") or is_loopback(master_url):
        return insecure
    if not insecure:
        raise AgentConfigError(
            f"EXECUTOR_MASTER_URL: plain http:// to {urlsplit(master_url).hostname} would send "
            "the node token unencrypted; use https:// with EXECUTOR_MASTER_CA, or set "
            "EXECUTOR_INSECURE=1 if the path is trusted"
        )
    log.warning("insecure: EXECUTOR_INSECURE=1, the master %s is plain http://", master_url)
    return insecure


def _master_ca(env: Mapping[str, str], master_url: str | None) -> str | None:
    """EXECUTOR_MASTER_CA: PEM text as is, else a file holding it; checked by ssl itself."""
    raw = env.get("EXECUTOR_MASTER_CA", "").strip()
    if not raw:
        return None
    if PEM_BEGIN in raw:
        text = raw
    else:
        try:
            text = Path(raw).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise AgentConfigError(f"EXECUTOR_MASTER_CA: cannot read {raw}: {exc}") from None
    pem = _rewrap(text)
    if not pem:
        raise AgentConfigError(f"EXECUTOR_MASTER_CA: {raw} holds no PEM certificate")
    try:
        ssl.create_default_context(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise AgentConfigError(f"EXECUTOR_MASTER_CA: not a usable certificate: {exc}") from None
    if master_url is not None and not master_url.startswith("https://"):
        raise AgentConfigError("EXECUTOR_MASTER_CA is set but EXECUTOR_MASTER_URL is not https://")
    return pem


def _rewrap(text: str) -> str:
    """Each certificate of `text` as PEM with 64-character lines: node.env can only hold
    them on one line (`imagefactory` writes them so), and ssl wants the line breaks."""
    blocks = []
    for body in _PEM_BLOCK.findall(text):
        b64 = re.sub(r"\s+", "", body)
        lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
        blocks.append(f"{PEM_BEGIN}\n{lines}\n-----END CERTIFICATE-----\n")
    return "".join(blocks)


def _client_cert(env: Mapping[str, str]) -> tuple[str, str] | None:
    cert = env.get("EXECUTOR_MASTER_CLIENT_CERT", "").strip()
    key = env.get("EXECUTOR_MASTER_CLIENT_KEY", "").strip()
    if not cert and not key:
        return None
    if not cert or not key:
        raise AgentConfigError(
            "EXECUTOR_MASTER_CLIENT_CERT and EXECUTOR_MASTER_CLIENT_KEY go together"
        )
    try:
        ssl.create_default_context().load_cert_chain(cert, key)
    except OSError as exc:  # ssl.SSLError included: a key that does not match
        raise AgentConfigError(f"EXECUTOR_MASTER_CLIENT_CERT/_KEY: {cert}, {key}: {exc}") from None
    return cert, key


def _run_id(env: Mapping[str, str], state_dir: Path) -> str:
    """EXECUTOR_RUN_ID, else the id generated by an earlier start, else a new persisted one.

    A stored id that cannot be read or is not an id (a crash, a full disk) counts as
    missing, and one that cannot be stored is used anyway: the node starts a new run
    rather than failing at every start."""
    if env.get("EXECUTOR_RUN_ID"):
        return settings.check_id("EXECUTOR_RUN_ID", env["EXECUTOR_RUN_ID"])
    stored = state_dir / RUN_ID_FILE
    try:
        return settings.check_id(str(stored), stored.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError, SettingsError) as exc:
        log.warning("%s is unreadable or corrupt (%s): starting a new run", stored, exc)
    run_id = str(uuid.uuid4())
    try:
        write_output(stored, f"{run_id}\n".encode(), mode=0o600)
    except OSError as exc:  # a full disk must not keep the node from running and reporting
        log.error("cannot keep the run id in %s (%s): a restart starts a new run", stored, exc)
    return run_id


def _token(env: Mapping[str, str]) -> str | None:
    """EXECUTOR_TOKEN, else EXECUTOR_TOKEN_FILE; it goes into an HTTP header, so visible
    ASCII only (http.client would refuse a newline or a non-Latin-1 character at every
    request). The token itself never appears in a message."""
    token = env.get("EXECUTOR_TOKEN", "").strip()
    if token:
        if not _TOKEN.fullmatch(token):
            raise AgentConfigError(f"EXECUTOR_TOKEN: {_TOKEN_RULE}")
        return token
    return _token_file(env)


def _token_file(env: Mapping[str, str]) -> str | None:
    """EXECUTOR_TOKEN_FILE: the token in a file (kept out of every environment)."""
    path = env.get("EXECUTOR_TOKEN_FILE", "").strip()
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentConfigError(f"EXECUTOR_TOKEN_FILE: cannot read {path}: {exc}") from None
    if not token:
        raise AgentConfigError(f"EXECUTOR_TOKEN_FILE: {path} is empty")
    if not _TOKEN.fullmatch(token):
        raise AgentConfigError(f"EXECUTOR_TOKEN_FILE: {path}: {_TOKEN_RULE}")
    return token


def _archive_limits(env: Mapping[str, str]) -> ArchiveLimits:
    try:
        return ArchiveLimits.from_env(env)
    except ValueError as exc:
        raise AgentConfigError(str(exc)) from None


def _sha256(env: Mapping[str, str]) -> str | None:
    value = env.get("EXECUTOR_PIPELINE_SHA256", "").strip().lower()
    if value and not _SHA256.fullmatch(value):
        raise AgentConfigError("EXECUTOR_PIPELINE_SHA256: not 64 hexadecimal digits")
    return value or None


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    return settings.check_seconds(name, raw) if raw else default


def _on_complete(env: Mapping[str, str]) -> Literal["none", "poweroff"]:
    value = env.get("EXECUTOR_ON_COMPLETE", "").strip() or "none"
    if value == "none":
        return "none"
    if value == "poweroff":
        return "poweroff"
    raise AgentConfigError(f"EXECUTOR_ON_COMPLETE: {value!r} is not none or poweroff")


def _command(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = env.get("EXECUTOR_POWEROFF_COMMAND", "").strip() or "systemctl poweroff"
    try:
        argv = tuple(shlex.split(raw))
    except ValueError as exc:
        raise AgentConfigError(f"EXECUTOR_POWEROFF_COMMAND: {exc}") from None
    return argv
