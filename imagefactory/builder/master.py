"""The builder's HTTP client of the core services' builder API.

Errors come in three kinds, which the worker treats differently: `Unreachable` (no
answer, or a 5xx: the master restarts; try again later), `LeaseLost` (409: the build is
not ours any more; stop it and upload nothing), and `Refused` (any other 4xx: a bug or a
bad setting; retrying does not help).
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import httpx

from imagefactory.client import tls_verify

log = logging.getLogger("imagefactory.builder")

REQUEST_TIMEOUT_S = 60.0


class MasterError(Exception):
    pass


class Unreachable(MasterError):
    pass


class LeaseLost(MasterError):
    pass


class Refused(MasterError):
    def __init__(self, status: int, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.body = body


class MasterClient:
    def __init__(
        self, url: str, builder_id: str, token: str, tls: ssl.SSLContext | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.builder_id = builder_id
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}", "X-Builder-ID": builder_id},
            timeout=REQUEST_TIMEOUT_S,
            verify=tls or tls_verify(self.url),  # docs/tls.md
        )

    def close(self) -> None:
        self._http.close()

    def claim(self, targets: list[str], formats: list[str], wait_s: float) -> dict[str, Any] | None:
        body = {"targets": targets, "formats": formats, "wait_s": wait_s}
        response = self._call("POST", "/v1/builder/claim", json=body, timeout=wait_s + 30)
        return None if response.status_code == 204 else dict(response.json())

    def pipeline(self, build_id: str, attempt: int) -> bytes:
        path = f"/v1/builder/jobs/{build_id}/pipeline"
        return self._call("GET", path, params={"attempt": attempt}).content

    def heartbeat(self, build_id: str, attempt: int, progress: dict[str, Any]) -> bool:
        """Renew the lease; True if the build was cancelled."""
        body = {"attempt": attempt, **progress}
        response = self._call("POST", f"/v1/builder/jobs/{build_id}/heartbeat", json=body)
        return bool(response.json()["cancel"])

    def upload_status(
        self, build_id: str, attempt: int, digest: str, size: int
    ) -> tuple[int, bool]:
        """Announce an upload: (the offset to go on from, whether the master has it all)."""
        body = {"attempt": attempt, "digest": digest, "size": size}
        status = self._call("POST", f"/v1/builder/jobs/{build_id}/uploads", json=body).json()
        return int(status["offset"]), bool(status["complete"])

    def upload_chunk(
        self, build_id: str, attempt: int, digest: str, size: int, offset: int, data: bytes
    ) -> tuple[int, bool]:
        """Send one chunk: (the stored offset, also when the master had another; whether
        the master has it all, verified)."""
        params = {"attempt": attempt, "offset": offset, "size": size}
        headers = {"Content-Type": "application/octet-stream"}
        path = f"/v1/builder/jobs/{build_id}/uploads/{digest}"
        try:
            response = self._call("PATCH", path, params=params, content=data, headers=headers)
        except Refused as exc:
            if exc.status == 409 and isinstance(exc.body.get("offset"), int):
                return int(exc.body["offset"]), False  # resume where the master is
            raise
        status = response.json()
        return int(status["offset"]), bool(status["complete"])

    def finish(self, build_id: str, attempt: int, outcome: dict[str, Any]) -> dict[str, Any]:
        body = {"attempt": attempt, **outcome}
        return dict(self._call("POST", f"/v1/builder/jobs/{build_id}/finish", json=body).json())

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"{method} {path}: {exc or type(exc).__name__}") from None
        if response.is_success:
            return response
        try:
            body = response.json()
            message = str(body["error"])
        except (ValueError, KeyError, TypeError):
            body, message = {}, response.text.strip()[:200]
        if response.status_code >= 500:
            raise Unreachable(f"{method} {path}: {response.status_code} {message}")
        if response.status_code == 409 and "lease lost" in message:
            raise LeaseLost(message)
        raise Refused(response.status_code, f"{method} {path}: {message}", body)
