"""A small HTTP client for the admin commands (`imagefactory nodes`, `runs`, ...), and the
TLS rules every host-side client of the core services follows (docs/tls.md)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from executor.agent.config import is_loopback
from imagefactory.errors import die

CA_ENV = "IMAGEFACTORY_CA"


def tls_verify(
    url: str,
    ca_file: Path | None = None,
    insecure: bool = False,
    client_cert: tuple[Path, Path] | None = None,
) -> ssl.SSLContext:
    """How to verify the core services at `url`: against `ca_file` (else $IMAGEFACTORY_CA,
    else the system's CAs), host name checked; `client_cert` (certificate, key) is shown to
    a master that asks (mutual TLS). A plain http:// URL beyond loopback is refused unless
    `insecure`: the bearer token would cross the network unencrypted."""
    if url.startswith("http://") and not is_loopback(url) and not insecure:
        raise die(
            f"refusing plain http:// to {urlsplit(url).hostname}: the token would cross the "
            "network unencrypted",
            hint="use https:// (and --ca-file with the fleet's bundle.crt), or --insecure",
        )
    ca = ca_file or (Path(os.environ[CA_ENV]) if os.environ.get(CA_ENV) else None)
    try:
        context = ssl.create_default_context(cafile=None if ca is None else str(ca))
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise die(f"cannot use CA file {ca}: {exc}") from None
    if client_cert is not None:
        try:
            context.load_cert_chain(*client_cert)
        except OSError as exc:
            raise die(f"cannot use client certificate {client_cert[0]}: {exc}") from None
    return context


def describe(exc: httpx.HTTPError) -> str:
    """An httpx error in one line; an untrusted certificate says so."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        why = text.split("certificate verify failed:", 1)[-1].split("(_ssl", 1)[0].strip()
        return f"server certificate not trusted: {why} (hint: --ca-file / {CA_ENV})"
    return text


class AdminClient:
    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 30.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
            verify=tls or tls_verify(self.url),
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._http.close()

    def get_json(self, path: str, **params: Any) -> Any:
        query = {k: v for k, v in params.items() if v is not None}
        return self._checked(self._request("GET", path, params=query)).json()

    def put_bytes(self, path: str, data: bytes) -> Any:
        headers = {"Content-Type": "application/gzip"}
        return self._checked(self._request("PUT", path, content=data, headers=headers)).json()

    def post_json(self, path: str, body: Any = None) -> Any:
        return self._checked(self._request("POST", path, json=body)).json()

    def poll_json(self, path: str) -> Any | None:
        """GET for a caller that polls: the JSON; None for 404 (not there yet) and while
        the services cannot be reached; other answers (a refused token) raise."""
        try:
            response = self._http.request("GET", path)
        except httpx.HTTPError:
            return None
        return None if response.status_code == 404 else self._checked(response).json()

    def put_json(self, path: str, body: Any) -> Any:
        return self._checked(self._request("PUT", path, json=body)).json()

    def delete(self, path: str, **params: Any) -> None:
        """DELETE; the answer (204) has no body."""
        query = {k: v for k, v in params.items() if v is not None}
        self._checked(self._request("DELETE", path, params=query))

    def stream_lines(self, path: str, **params: Any) -> Iterator[str]:
        """The lines of a streamed text response, as they come (no read timeout)."""
        query = {k: v for k, v in params.items() if v is not None}
        timeout = httpx.Timeout(30, read=None)
        try:
            with self._http.stream("GET", path, params=query, timeout=timeout) as response:
                self.check(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise die(f"lost the connection to {self.url}: {describe(exc)}") from None

    @contextmanager
    def stream(self, path: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """A streamed GET (downloads); the caller checks the status."""
        try:
            with self._http.stream("GET", path, headers=headers) as response:
                yield response
        except httpx.HTTPError as exc:
            raise die(f"download from {self.url} failed: {describe(exc)}") from None

    def check(self, response: httpx.Response) -> httpx.Response:
        """The response, or the one-line error it carries."""
        if not response.is_success:
            response.read()
        return self._checked(response)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise die(
                f"cannot reach core services at {self.url}: {describe(exc)}",
                hint="check the URL, and that `imagefactory serve` runs there",
            ) from None

    def _checked(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            message = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            message = response.text.strip()[:200]
        raise die(
            f"{response.request.method} {response.request.url.path}: "
            f"{response.status_code} {message}"
        )
