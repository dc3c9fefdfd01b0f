"""Request body size limit, enforced before any endpoint reads the body.

A declared Content-Length over the limit is answered 413 at once, without reading the body;
a body without Content-Length (chunked) is counted while it is read.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            error = self._check_declared(declared)
            if error is not None:
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
