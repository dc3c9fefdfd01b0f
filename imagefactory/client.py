"""A small HTTP client for the admin commands (`imagefactory nodes`, `runs`, ...)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from imagefactory.errors import die


class AdminClient:
    def __init__(self, url: str, token: str, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout_s,
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

    def stream_lines(self, path: str, **params: Any) -> Iterator[str]:
        """The lines of a streamed text response, as they come (no read timeout)."""
        query = {k: v for k, v in params.items() if v is not None}
        timeout = httpx.Timeout(30, read=None)
        try:
            with self._http.stream("GET", path, params=query, timeout=timeout) as response:
                self.check(response)
                yield from response.iter_lines()
        except httpx.HTTPError as exc:
            raise die(f"lost the connection to {self.url}: {exc}") from None

    @contextmanager
    def stream(self, path: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """A streamed GET (downloads); the caller checks the status."""
        try:
            with self._http.stream("GET", path, headers=headers) as response:
                yield response
        except httpx.HTTPError as exc:
            raise die(f"download from {self.url} failed: {exc}") from None

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
                f"cannot reach core services at {self.url}: {exc}",
                hint="start them with `imagefactory serve` or pass --url",
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
