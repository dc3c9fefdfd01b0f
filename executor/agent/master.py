"""Requests to the master with urllib, each outcome classified for the retry policy:
2xx is an answer, network errors / 5xx / 408 / 425 / 429 are transient (retry with backoff),
every other 4xx is a refusal that retrying cannot fix.

An https:// master is verified (certificate chain and host name) against EXECUTOR_MASTER_CA,
else the system's trust store. A certificate that does not verify is Untrusted: logged once
as one clear line, and retried like any transient problem, so that what is spooled is
delivered as soon as the master's certificate is fixed."""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, BinaryIO

from tenacity import RetryCallState, wait_random_exponential

TRANSIENT_STATUS = frozenset({408, 425, 429})
log = logging.getLogger("executor.agent.master")
_CHUNK = 1 << 20


def backoff(give_up_after_s: float | None = None) -> Callable[[RetryCallState], float]:
    """Exponential backoff with full jitter, from 200 ms up to 60 s. With `give_up_after_s`
    no wait goes past that time since the first attempt: the last attempt is made then,
    not up to a whole backoff later (tenacity's stop is only checked after an attempt)."""
    wait = wait_random_exponential(multiplier=0.2, min=0.2, max=60)
    if give_up_after_s is None:
        return wait

    def until_give_up(state: RetryCallState) -> float:
        left = give_up_after_s - (state.seconds_since_start or 0.0)
        return max(0.0, min(wait(state), left))

    return until_give_up


class Transient(Exception):
    """The master could not be reached or had a passing problem; try again later."""


class Untrusted(Transient):
    """The master's certificate did not verify (unknown CA, wrong host name, expired)."""


class TooLarge(Exception):
    """The master sent, or announced, more than the caller accepts."""


class Refused(Exception):
    """The master answered with a 4xx that retrying cannot fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    """Header names in lower case."""
    body: bytes


@dataclass(frozen=True)
class Master:
    """The core services as seen by one node."""

    url: str
    token: str
    node_id: str
    timeout_s: float = 30.0
    ca_pem: str | None = None
    """The CA certificates (PEM) the master's certificate must chain to; None: the system's."""
    client_cert: tuple[str, str] | None = None
    """(certificate file, key file) shown to a master that asks (mutual TLS)."""

    @cached_property
    def _opener(self) -> urllib.request.OpenerDirector:
        # Straight to the master: never through an http_proxy from the environment.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        # Only for https: reading the trust store is slow on a small or emulated CPU.
        if urllib.parse.urlsplit(self.url).scheme == "https":
            handlers.append(urllib.request.HTTPSHandler(context=self.tls()))
        return urllib.request.build_opener(*handlers)

    def tls(self) -> ssl.SSLContext:
        """Verify the chain and the host name (create_default_context's defaults)."""
        context = ssl.create_default_context(cadata=self.ca_pem)
        if self.client_cert is not None:
            context.load_cert_chain(*self.client_cert)
        return context

    def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout_s: float | None = None
    ) -> Answer:
        """One attempt; returns a 2xx Answer or raises Transient / Refused."""
        with self._exchange(method, path, body, timeout_s) as resp:
            return Answer(resp.status, _headers(resp), _read(resp, method, path))

    def download(
        self, path: str, out: BinaryIO, max_bytes: int, *, timeout_s: float | None = None
    ) -> tuple[dict[str, str], str]:
        """GET `path` into `out` as it arrives; returns the headers and the body's sha256.

        One attempt: raises Transient / Refused as `request` does, and TooLarge as soon as
        the announced or received body passes `max_bytes` (nothing beyond it is kept)."""
        digest = hashlib.sha256()
        with self._exchange("GET", path, None, timeout_s) as resp:
            headers = _headers(resp)
            announced = headers.get("content-length", "")
            if announced.isdigit() and int(announced) > max_bytes:
                raise TooLarge(f"GET {path}: {announced} bytes announced, over {max_bytes}")
            received = 0
            while chunk := _read(resp, "GET", path, _CHUNK):
                received += len(chunk)
                if received > max_bytes:
                    raise TooLarge(f"GET {path}: more than {max_bytes} bytes")
                digest.update(chunk)
                out.write(chunk)
        return headers, digest.hexdigest()

    @contextmanager
    def _exchange(
        self, method: str, path: str, body: bytes | None, timeout_s: float | None
    ) -> Iterator[http.client.HTTPResponse]:
        """The open response to one request; a non-2xx raises Transient / Refused."""
        headers = {
            "Authorization": f"Bearer {self.token}",
            "X-Node-ID": self.node_id,
            "User-Agent": "executor-agent",
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url.rstrip("/") + path, body, headers, method=method)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            resp = self._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            status, message = exc.code, _error_message(exc)
        except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
            if untrusted := _verify_failure(exc):
                _log_once(f"master certificate not trusted: {untrusted} ({self.url})")
                raise Untrusted(f"{method} {path}: certificate not trusted: {untrusted}") from None
            log.debug("%s %s: %s", method, path, _reason(exc))
            raise Transient(f"{method} {path}: {_reason(exc)}") from None
        else:
            log.debug("%s %s: %d", method, path, resp.status)
            with resp:
                yield resp
            return
        log.debug("%s %s: %d %s", method, path, status, message)
        if status >= 500 or status in TRANSIENT_STATUS:
            raise Transient(f"{method} {path}: {status} {message}")
        raise Refused(status, f"{method} {path}: {status} {message}")


_logged_lock = threading.Lock()
_last_logged: list[str] = []


def _log_once(line: str) -> None:
    """Log a TLS refusal once, not at every retry (again if the reason changes)."""
    with _logged_lock:
        if _last_logged != [line]:
            _last_logged[:] = [line]
            log.error("%s", line)


def _verify_failure(exc: BaseException) -> str | None:
    """What the certificate check said, if that is why the request failed."""
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, ssl.SSLCertVerificationError):
        return str(reason.verify_message or reason)
    return None


def _headers(resp: http.client.HTTPResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in resp.headers.items()}


def _read(resp: http.client.HTTPResponse, method: str, path: str, size: int = -1) -> bytes:
    """Read the body (`size` bytes at most); a broken transfer is Transient."""
    try:
        return resp.read(size)
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(f"{method} {path}: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        raw = exc.read()
    except OSError:
        return str(exc.reason)
    try:
        parsed: Any = json.loads(raw)
        return str(parsed["error"])
    except (ValueError, KeyError, TypeError):
        return raw.decode("utf-8", "replace").strip()[:200] or str(exc.reason)
