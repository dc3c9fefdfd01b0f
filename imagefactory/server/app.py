"""The v1 HTTP API of the core services (docs/reference/http-api.md), as a FastAPI app.

Every error is `{"error": "..."}`. Validation failures are 400 (not FastAPI's 422). A
request that is rejected changes nothing: all checks run before the one write it makes.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from imagefactory import __version__
from imagefactory.server.auth import Authority, bearer_token
from imagefactory.server.blobs import BlobStore
from imagefactory.server.build_routes import build_router
from imagefactory.server.buildqueue import BuildQueue
from imagefactory.server.config import ServerConfig
from imagefactory.server.device_routes import device_router
from imagefactory.server.device_store import DeviceStore
from imagefactory.server.fastpath import HeartbeatFastPath, record_heartbeat, validation_message
from imagefactory.server.heartbeats import HeartbeatWriter
from imagefactory.server.limits import BodyLimitMiddleware
from imagefactory.server.schemas import (
    ID_PATTERN,
    ErrorBody,
    Heartbeat,
    NodeStatus,
    PipelineAck,
    Report,
    ReportAck,
    RunSummary,
)
from imagefactory.server.storage import Storage

log = logging.getLogger("imagefactory.server")

NodeId = Annotated[str, Path(pattern=ID_PATTERN)]
RunId = Annotated[str, Path(pattern=ID_PATTERN)]
PipelineName = Annotated[str, Path(pattern=ID_PATTERN)]
Authorization = Annotated[str | None, Header()]
XNodeId = Annotated[str | None, Header(alias="X-Node-ID", pattern=ID_PATTERN)]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413)
}


def create_app(config: ServerConfig, storage: Storage | None = None) -> ASGIApp:
    """The ASGI app: the FastAPI API behind the body limit and the heartbeat fast path.
    `storage` defaults to one opened on `config.db_url`."""
    store = storage if storage is not None else Storage(config.db_url)
    authority = Authority(config.secret, config.admin_token)
    writer = HeartbeatWriter(store)
    queue = BuildQueue(store.engine, config.lease_s, config.max_attempts)
    blobs = BlobStore(config.environment_store())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        writer.start()
        try:
            yield
        finally:
            await writer.stop()

    app = FastAPI(
        title="fleetbake core services",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        responses=ERRORS,
        **_without_telemetry(),
    )

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(list(exc.errors()))}, status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error", exc_info=exc)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}"}, status_code=500)

    # Valid node ids are answered by HeartbeatFastPath before they get here; this route
    # documents the endpoint and rejects invalid node ids.
    @app.post("/v1/nodes/{node_id}/heartbeats", status_code=204, response_class=Response)
    async def heartbeat(
        node_id: NodeId, beat: Heartbeat, authorization: Authorization = None
    ) -> Response:
        """A node is alive; records its run, state and progress."""
        await record_heartbeat(authority, writer, node_id, authorization, beat)
        return Response(status_code=204)

    @app.put(
        "/v1/runs/{run_id}/report",
        response_model=ReportAck,
        status_code=201,
        responses={200: {"model": ReportAck, "description": "An equal report was stored before"}},
        openapi_extra=_request_body("application/json", {"$ref": "#/components/schemas/Report"}),
    )
    async def put_report(
        run_id: RunId,
        request: Request,
        authorization: Authorization = None,
        x_node_id: XNodeId = None,
    ) -> JSONResponse:
        """Store a run's results and combined log: 201, 200 for an equal repeat, else 409.
        With X-Node-ID (agents send it) the token is checked before the body is read."""
        token = bearer_token(authorization)
        if x_node_id is not None:
            authority.require_node(token, x_node_id)
        report = _parse_report(await request.body())
        authority.require_node(token, report["node_id"])
        if report["run_id"] != run_id:
            raise HTTPException(400, f"run_id in body ({report['run_id']}) differs from path")
        outcome = await run_in_threadpool(store.put_report, report)
        if outcome == "conflict":
            raise HTTPException(409, f"run {run_id} already has a different report")
        status = 201 if outcome == "created" else 200
        return JSONResponse({"run_id": run_id, "stored": outcome}, status_code=status)

    @app.get("/v1/runs/{run_id}", responses={200: {"model": Report}})
    async def get_report(
        run_id: RunId, authorization: Authorization = None, x_node_id: XNodeId = None
    ) -> JSONResponse:
        """The stored report of a run (admin)."""
        authority.require_admin(bearer_token(authorization), x_node_id)
        report = await run_in_threadpool(store.get_report, run_id)
        if report is None:
            raise HTTPException(404, f"no report for run {run_id}")
        return JSONResponse(report)

    @app.get("/v1/runs", response_model=list[RunSummary])
    async def list_runs(
        authorization: Authorization = None,
        x_node_id: XNodeId = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        node: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    ) -> list[dict[str, Any]]:
        """The latest reports, newest first (admin)."""
        authority.require_admin(bearer_token(authorization), x_node_id)
        return await run_in_threadpool(store.runs, limit, node)

    @app.get("/v1/nodes", response_model=list[NodeStatus])
    async def list_nodes(
        authorization: Authorization = None, x_node_id: XNodeId = None
    ) -> list[dict[str, Any]]:
        """Every node that sent a heartbeat, with its last state (admin)."""
        authority.require_admin(bearer_token(authorization), x_node_id)
        return await run_in_threadpool(store.nodes)

    @app.put(
        "/v1/pipelines/{name}",
        response_model=PipelineAck,
        openapi_extra=_request_body("application/gzip", {"type": "string", "format": "binary"}),
    )
    async def put_pipeline(
        name: PipelineName,
        request: Request,
        authorization: Authorization = None,
        x_node_id: XNodeId = None,
    ) -> dict[str, Any]:
        """Publish (or replace) a pipeline `.tar.gz` (admin)."""
        authority.require_admin(bearer_token(authorization), x_node_id)
        data = await request.body()
        if not data.startswith(b"\x1f\x8b"):
            raise HTTPException(400, "body is not a gzip archive (.tar.gz)")
        sha = await run_in_threadpool(store.put_pipeline, name, data)
        return {"name": name, "sha256": sha, "size": len(data)}

    @app.get(
        "/v1/pipelines/{name}",
        response_class=Response,
        responses={200: {"content": {"application/gzip": {}}}},
    )
    async def get_pipeline(
        name: PipelineName, authorization: Authorization = None, x_node_id: XNodeId = None
    ) -> Response:
        """Download a pipeline (any valid node, with X-Node-ID); header X-Pipeline-SHA256."""
        authority.require_node_or_admin(bearer_token(authorization), x_node_id)
        found = await run_in_threadpool(store.get_pipeline, name)
        if found is None:
            raise HTTPException(404, f"no pipeline named {name}")
        data, sha = found
        return Response(data, media_type="application/gzip", headers={"X-Pipeline-SHA256": sha})

    app.include_router(build_router(config, authority, store, queue, blobs))
    app.include_router(device_router(config, authority, DeviceStore(store.engine)))

    # Outside in: the size limit, then the heartbeat fast path, then FastAPI.
    fast = HeartbeatFastPath(app, authority, writer)
    return BodyLimitMiddleware(fast, max_body_bytes=config.max_body_bytes)


def _request_body(media_type: str, schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for a body the endpoint reads itself (to store it exactly as sent)."""
    return {"requestBody": {"required": True, "content": {media_type: {"schema": schema}}}}


def _without_telemetry() -> dict[str, Any]:
    """Newer FastAPI traces every request with OpenTelemetry unless told not to (a large part
    of the cost of a heartbeat); older versions have no such option."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    return {"telemetry": off}


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def strict_json(body: bytes) -> Any:
    """JSON as RFC 8259 has it, or a 400: no NaN or Infinity, no lone surrogates (which no
    reader could store or send on), and nothing nested deeper than the parser can go."""
    try:
        value = json.loads(body, parse_constant=_refuse_constant)
        if _SURROGATE_ESCAPE.search(body):  # pairs are fine, lone ones fail to encode
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise HTTPException(400, "body is not valid JSON: nested too deeply") from None
    except (UnicodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise HTTPException(400, f"body is not valid JSON: {_first_line(exc)}") from None
    return value


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _parse_report(body: bytes) -> dict[str, Any]:
    """The report as the node sent it (stored verbatim), after schema validation."""
    report = strict_json(body)
    try:
        Report.model_validate(report)
    except ValidationError as exc:
        raise HTTPException(400, validation_message(list(exc.errors()))) from None
    assert isinstance(report, dict)
    return report
