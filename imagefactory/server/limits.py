"""Request body size limit, enforced before any endpoint reads the body.

A declared Content-Length over the limit is answered 413 without parsing the body. Up to
DRAIN_MAX_BYTES it is read and discarded first (unless the client waits for an answer
before it sends the body: `Expect: 100-continue`): a server that closes a connection with
unread data makes the kernel reset it, and the client (the agent's http.client) sees
"connection reset" instead of the 413, and retries what will never be taken. A larger
declared body is answered at once, and the connection closed. A body without
Content-Length (chunked) is counted while it is read.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_MAX_BYTES = 64 * 1024 * 1024
"""Twice the agent's own report limit (the server's default body limit, 32 MiB)."""


class BodyTooLarge(HTTPException):
    """An HTTPException, so that FastAPI's body parsing passes it through as a 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None:
            error = self._check_declared(declared)
            if error is not None:
                # A client that sent `Expect: 100-continue` waits for the answer before the
                # body: reading would ask it for the body, and nothing is in flight to reset.
                waits = b"expect" in headers
                if error.status_code == 413 and int(declared) <= DRAIN_MAX_BYTES and not waits:
                    await _drain(receive)
                await error(scope, receive, send)
                return
        await self.app(scope, self._counting(receive), send)

    def _check_declared(self, declared: bytes) -> JSONResponse | None:
        if not declared.isdigit():
            return JSONResponse({"error": "invalid Content-Length"}, status_code=400)
        if int(declared) > self.limit:
            return JSONResponse(
                {"error": f"request body exceeds {self.limit} bytes"},
                status_code=413,
                headers={"Connection": "close"},
            )
        return None

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        return counted


async def _drain(receive: Receive) -> None:
    """Read the request body to its end, keeping none of it."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
