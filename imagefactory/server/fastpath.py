"""The heartbeat hot path as plain ASGI.

A fleet sends far more heartbeats than anything else, and FastAPI's per-request machinery
(dependency solving, parameter models, response classes) costs more than the request
itself (docs/performance.md). This wrapper answers `POST /v1/nodes/{valid id}/heartbeats`
directly, with the same checks (size limit outside it, then the token, then the pydantic
schema) and the same group commit; every other request, including heartbeats for an
invalid node id (which the FastAPI route rejects), goes on to the FastAPI app, which also
documents the endpoint.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from imagefactory.server.auth import Authority, bearer_token
from imagefactory.server.heartbeats import HeartbeatWriter
from imagefactory.server.schemas import ID_PATTERN, Heartbeat
from imagefactory.server.storage import HeartbeatRow

log = logging.getLogger("imagefactory.server")

HEARTBEAT_PATH = re.compile(rf"/v1/nodes/(?P<node_id>{ID_PATTERN.strip('^$')})/heartbeats")


def validation_message(errors: list[Any]) -> str:
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return f"invalid {where}: {first.get('msg', 'invalid value')}"


async def record_heartbeat(
    authority: Authority,
    writer: HeartbeatWriter,
    node_id: str,
    authorization: str | None,
    beat: Heartbeat,
) -> None:
    """Check the node's token, then commit the heartbeat (returns after the commit)."""
    authority.require_node(bearer_token(authorization), node_id)
    await writer.record(_row(node_id, beat))


def _row(node_id: str, beat: Heartbeat) -> HeartbeatRow:
    return HeartbeatRow(node_id=node_id, last_seen=time.time(), **beat.model_dump())


class HeartbeatFastPath:
    def __init__(self, app: ASGIApp, authority: Authority, writer: HeartbeatWriter) -> None:
        self.app = app
        self.authority = authority
        self.writer = writer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = HEARTBEAT_PATH.fullmatch(scope["path"])
            if match is not None:
                await self._heartbeat(match["node_id"], scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _heartbeat(self, node_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            # The token first: an unauthenticated caller learns nothing about the body.
            self.authority.require_node(bearer_token(_header(scope, b"authorization")), node_id)
            body = await _read_body(receive)
            try:
                beat = Heartbeat.model_validate_json(body)
            except ValidationError as exc:
                raise HTTPException(400, validation_message(list(exc.errors()))) from None
            await self.writer.record(_row(node_id, beat))
        except HTTPException as exc:
            await JSONResponse({"error": exc.detail}, exc.status_code)(scope, receive, send)
            return
        except Exception as exc:  # outside FastAPI: answer like its internal error handler
            log.exception("internal error", exc_info=exc)
            error = {"error": f"internal error: {type(exc).__name__}"}
            await JSONResponse(error, 500)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPException(400, "client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
