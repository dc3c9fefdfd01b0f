"""A small HTTP client for the admin commands (`imagefactory nodes`, `runs`, ...)."""

from __future__ import annotations

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
