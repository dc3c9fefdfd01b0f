"""The build service endpoints: builds (admin), the builder API (builder tokens), and the
environment store (admin; downloads also node tokens). docs/build-service.md.

A builder may only touch the build it holds: every builder endpoint names the build, its
attempt and (in X-Builder-ID) the builder, and answers 409 once the lease is lost.

Tokens are checked by dependencies, which FastAPI runs before it validates a body: a caller
without the right token learns nothing about the schema.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from imagefactory.server.auth import Authority, bearer_token
from imagefactory.server.blobs import DIGEST_PATTERN, BlobStore, UploadError
from imagefactory.server.build_schemas import (
    Build,
    BuilderInfo,
    BuildRequest,
    ClaimRequest,
    Environment,
    Finish,
    Job,
    Progress,
    ProgressAck,
    PruneResult,
    UploadStart,
    UploadStatus,
)
from imagefactory.server.buildqueue import TERMINAL, BuildQueue, Lease, LeaseLost
from imagefactory.server.config import ServerConfig
from imagefactory.server.schemas import ID_PATTERN, INT64_MAX
from imagefactory.server.storage import Storage
from imagefactory.targets import target_names

BuildId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]
DigestPath = Annotated[str, Path(pattern=DIGEST_PATTERN)]
Authorization = Annotated[str | None, Header()]
XNodeId = Annotated[str | None, Header(alias="X-Node-ID", pattern=ID_PATTERN)]
XBuilderId = Annotated[str | None, Header(alias="X-Builder-ID", pattern=ID_PATTERN)]
Attempt = Annotated[int, Query(ge=1, le=INT64_MAX)]
POLL_S = 0.5


def build_router(
    config: ServerConfig, authority: Authority, storage: Storage, queue: BuildQueue,
    blobs: BlobStore,
) -> APIRouter:  # fmt: skip
    router = APIRouter()

    def admin(authorization: Authorization = None, x_node_id: XNodeId = None) -> None:
        authority.require_admin(bearer_token(authorization), x_node_id)

    def builder(authorization: Authorization = None, x_builder_id: XBuilderId = None) -> str:
        return authority.require_builder(bearer_token(authorization), x_builder_id)

    admin_only = [Depends(admin)]
    the_builder = Depends(builder)  # a default, not an annotation: those are module-level names

    async def build_or_404(build_id: str) -> dict[str, Any]:
        build = await run_in_threadpool(queue.get, build_id)
        if build is None:
            raise HTTPException(404, f"no build {build_id}")
        return build

    # -- builds (admin) ---------------------------------------------------------------------

    @router.post(
        "/v1/builds",
        response_model=Build,
        status_code=201,
        responses={200: {}},
        dependencies=admin_only,
    )
    async def submit_build(body: BuildRequest) -> JSONResponse:
        """Queue a build: 201. The same inputs while queued, building or built: that
        build, 200 (a succeeded one is not rebuilt)."""
        if body.target not in target_names():
            raise HTTPException(400, f"unknown target {body.target!r}: {', '.join(target_names())}")
        if body.format not in config.formats:
            known = ", ".join(config.formats) or "none"
            raise HTTPException(400, f"unknown format {body.format!r}: {known}")
        name, _, pinned = body.pipeline.partition("@sha256:")
        found = await run_in_threadpool(storage.get_pipeline, name)
        if found is None:
            raise HTTPException(404, f"no pipeline named {name} in the gateway")
        data, sha = found
        if pinned and pinned != sha:
            raise HTTPException(409, f"pipeline {name} has sha256 {sha}, not {pinned}")

        def keep_and_queue() -> tuple[dict[str, Any], bool]:
            with blobs.in_use():  # The build keeps its own copy: republishing the name
                blobs.put_bytes(data)  # does not change it.
                return queue.submit(body.target, body.format, name, sha)

        build, created = await run_in_threadpool(keep_and_queue)
        return JSONResponse(build, status_code=201 if created else 200)

    @router.get("/v1/builds", response_model=list[Build], dependencies=admin_only)
    async def list_builds(
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        state: Annotated[
            str | None, Query(pattern=r"^(queued|building|succeeded|failed|cancelled)$")
        ] = None,  # noqa: E501
    ) -> list[dict[str, Any]]:
        """Builds, newest first."""
        return await run_in_threadpool(queue.listing, limit, state)

    @router.get("/v1/builds/{build_id}", response_model=Build, dependencies=admin_only)
    async def get_build(build_id: BuildId) -> dict[str, Any]:
        """One build: state, builder, attempt, stage in progress, stage timings, artifacts."""
        await run_in_threadpool(queue.expire_leases)
        return await build_or_404(build_id)

    @router.post("/v1/builds/{build_id}/cancel", response_model=Build, dependencies=admin_only)
    async def cancel_build(build_id: BuildId) -> dict[str, Any]:
        """Cancel: a queued build at once; a running one when its builder has stopped the
        bake (cancel_requested until then). An ended build is returned unchanged."""
        build = await run_in_threadpool(queue.cancel, build_id)
        if build is None:
            raise HTTPException(404, f"no build {build_id}")
        return build

    @router.get(
        "/v1/builds/{build_id}/log",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/plain": {}}}},
        dependencies=admin_only,
    )
    async def build_log(build_id: BuildId, follow: bool = True) -> StreamingResponse:
        """The build log as text; with follow (the default) it streams until the build ends."""
        await build_or_404(build_id)
        return StreamingResponse(_log_lines(queue, build_id, follow), media_type="text/plain")

    @router.get("/v1/builders", response_model=list[BuilderInfo], dependencies=admin_only)
    async def list_builders() -> list[dict[str, Any]]:
        """Registered builders, with the targets and formats they can build."""
        return await run_in_threadpool(queue.builders)

    # -- the builder API --------------------------------------------------------------------

    async def held(lease_: Lease, renew: bool = False) -> None:
        check = queue.touch if renew else queue.holds
        if not await run_in_threadpool(check, lease_):
            raise HTTPException(409, f"build {lease_.build_id}: lease lost")

    @router.post("/v1/builder/claim", response_model=Job, responses={204: {}})
    async def claim(
        body: ClaimRequest,
        request: Request,
        builder_id: str = the_builder,
    ) -> Response:
        """Register, then wait up to wait_s for a queued build this builder can make:
        200 with the job (the lease starts now) or 204."""
        await run_in_threadpool(queue.register, builder_id, body.targets, body.formats)
        deadline = time.monotonic() + body.wait_s
        while True:
            await run_in_threadpool(queue.expire_leases)
            build = await run_in_threadpool(queue.claim, builder_id, body.targets, body.formats)
            if build is not None:
                job = {"build": build, "lease_s": queue.lease_s, "registry": config.registry}
                return JSONResponse(job)
            if time.monotonic() + POLL_S > deadline or await request.is_disconnected():
                return Response(status_code=204)  # (a gone builder claims nothing)
            await asyncio.sleep(POLL_S)

    @router.get(
        "/v1/builder/jobs/{build_id}/pipeline",
        response_class=Response,
        responses={200: {"content": {"application/gzip": {}}}},
    )
    async def job_pipeline(
        build_id: BuildId,
        attempt: Attempt,
        builder_id: str = the_builder,
    ) -> Response:
        """The pipeline archive of the build this builder holds."""
        lease_ = Lease(build_id, builder_id, attempt)
        await held(lease_)
        build = await build_or_404(build_id)
        data = await run_in_threadpool(blobs.read_bytes, f"sha256:{build['pipeline_sha256']}")
        if data is None:
            raise HTTPException(404, f"pipeline of build {build_id} is no longer stored")
        return Response(data, media_type="application/gzip")

    @router.post("/v1/builder/jobs/{build_id}/heartbeat", response_model=ProgressAck)
    async def heartbeat(
        build_id: BuildId,
        body: Progress,
        builder_id: str = the_builder,
    ) -> dict[str, Any]:
        """Renew the lease, record the stage, stage timings and new log lines."""
        lease_ = Lease(build_id, builder_id, body.attempt)
        try:
            cancel = await run_in_threadpool(queue.renew, lease_, body.stage, body.stages, body.log)
        except LeaseLost:
            raise HTTPException(409, f"build {build_id}: lease lost") from None
        return {"cancel": cancel}

    @router.post("/v1/builder/jobs/{build_id}/uploads", response_model=UploadStatus)
    async def start_upload(
        build_id: BuildId,
        body: UploadStart,
        builder_id: str = the_builder,
    ) -> dict[str, Any]:
        """Announce an artifact (or ask where its upload stands, to resume it)."""
        lease_ = Lease(build_id, builder_id, body.attempt)
        await held(lease_, renew=True)

        def record() -> int:
            with blobs.in_use():
                queue.uploaded(lease_, body.digest)
                return blobs.upload_offset(_upload_id(lease_, body.digest), body.digest)

        return _status(body.digest, body.size, await run_in_threadpool(record), blobs)

    @router.patch(
        "/v1/builder/jobs/{build_id}/uploads/{digest}",
        response_model=UploadStatus,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                    "format": "binary"}}},
            }
        },
    )  # fmt: skip
    async def upload_chunk(
        build_id: BuildId,
        digest: DigestPath,
        request: Request,
        attempt: Attempt,
        offset: Annotated[int, Query(ge=0, le=INT64_MAX)],
        size: Annotated[int, Query(ge=0, le=INT64_MAX)],
        builder_id: str = the_builder,
    ) -> Any:
        """Append a chunk at `offset`; 409 with the stored offset if it is not where the
        upload ends. The last chunk is verified against the digest (400 if it differs:
        the upload starts over)."""
        lease_ = Lease(build_id, builder_id, attempt)
        await held(lease_, renew=True)
        data = await request.body()

        def append() -> int:
            with blobs.in_use():
                return blobs.append(_upload_id(lease_, digest), digest, size, offset, data)

        try:
            stored = await run_in_threadpool(append)
        except UploadError as exc:
            return _error(400 if exc.invalid else 409, str(exc), offset=exc.offset)
        return _status(digest, size, stored, blobs)

    @router.post("/v1/builder/jobs/{build_id}/finish", response_model=Build)
    async def finish(
        build_id: BuildId,
        body: Finish,
        builder_id: str = the_builder,
    ) -> dict[str, Any]:
        """End the attempt. A success names its uploaded artifacts, which become
        environments; 409 once the lease is lost (nothing is recorded)."""
        lease_ = Lease(build_id, builder_id, body.attempt)
        await held(lease_)
        artifacts = [a.model_dump() for a in body.artifacts]
        if body.state == "succeeded" and not artifacts:
            raise HTTPException(400, "a succeeded build needs at least one artifact")
        pushed = body.pushed.model_dump() if body.pushed else None
        if pushed is not None:  # what a puller must know, from the master's own setting
            pushed["plain_http"] = (config.registry or "").startswith("http://")

        def check_and_finish() -> dict[str, Any]:
            with blobs.in_use():  # the artifacts are there, and stay until recorded
                for a in artifacts if body.state == "succeeded" else []:
                    if not blobs.has(a["digest"]) or blobs.size(a["digest"]) != a["size"]:
                        raise HTTPException(
                            400, f"artifact {a['name']} ({a['digest']}) not uploaded"
                        )
                return queue.finish(lease_, body.state, body.stages, artifacts, body.error, pushed)

        try:
            build = await run_in_threadpool(check_and_finish)
        except LeaseLost:
            raise HTTPException(409, f"build {build_id}: lease lost") from None
        await run_in_threadpool(blobs.discard_uploads, f"{build_id}.")
        return build

    # -- environments -----------------------------------------------------------------------

    @router.get("/v1/environments", response_model=list[Environment], dependencies=admin_only)
    async def list_environments() -> list[dict[str, Any]]:
        """Environments built: target, format, pipeline sha256, build, digest, size, time."""
        return await run_in_threadpool(queue.environments)

    @router.get(
        "/v1/environments/{digest}",
        response_class=FileResponse,
        responses={
            200: {"content": {"application/octet-stream": {}}},
            206: {"content": {"application/octet-stream": {}}},
            304: {},
            416: {"content": {"text/plain": {}}},
        },
    )
    async def download_environment(
        digest: DigestPath,
        authorization: Authorization = None,
        x_node_id: XNodeId = None,
        if_none_match: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Download one environment file (admin, or a node with X-Node-ID). Supports Range;
        the ETag is the digest, so If-None-Match with it answers 304."""
        authority.require_node_or_admin(bearer_token(authorization), x_node_id)
        env = await run_in_threadpool(queue.environment, digest)
        if env is None or not blobs.has(digest):
            raise HTTPException(404, f"no environment {digest}")
        etag = f'"{digest}"'
        if if_none_match is not None and etag in (t.strip() for t in if_none_match.split(",")):
            return Response(status_code=304, headers={"ETag": etag})
        return FileResponse(
            blobs.path(digest),
            media_type="application/octet-stream",
            filename=env["name"],
            headers={"ETag": etag},
        )

    @router.post("/v1/environments/prune", response_model=PruneResult, dependencies=admin_only)
    async def prune() -> dict[str, Any]:
        """Remove the stored blobs nothing references, and uploads of builds that ended."""
        return await run_in_threadpool(_prune, queue, blobs)

    return router


def _upload_id(lease: Lease, digest: str) -> str:
    return f"{lease.build_id}.{lease.attempt}.{digest.removeprefix('sha256:')}"


def _status(digest: str, size: int, offset: int, blobs: BlobStore) -> dict[str, Any]:
    return {"digest": digest, "size": size, "offset": offset, "complete": blobs.has(digest)}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _prune(queue: BuildQueue, blobs: BlobStore) -> dict[str, Any]:
    with blobs.pruning():
        return _remove_unreferenced(queue, blobs)


def _remove_unreferenced(queue: BuildQueue, blobs: BlobStore) -> dict[str, Any]:
    keep = queue.referenced()
    removed, freed = [], 0
    for digest in blobs.digests():
        if digest not in keep:
            freed += blobs.remove(digest)
            removed.append(digest)
    active = queue.active_build_ids()
    for path in blobs.uploads.glob("*") if blobs.uploads.is_dir() else []:
        if path.name.split(".", 1)[0] not in active:
            freed += path.stat().st_size
            path.unlink(missing_ok=True)
    return {"removed": removed, "freed_bytes": freed}


async def _log_lines(queue: BuildQueue, build_id: str, follow: bool) -> AsyncIterator[bytes]:
    last = 0
    while True:
        lines = await run_in_threadpool(queue.log_since, build_id, last)
        for seq, text in lines:
            last = seq
            yield (text + "\n").encode()
        if lines:
            continue
        build = await run_in_threadpool(queue.get, build_id)
        if not follow or build is None or build["state"] in TERMINAL:
            if not await run_in_threadpool(queue.log_since, build_id, last):
                return
            continue
        await run_in_threadpool(queue.expire_leases)
        await asyncio.sleep(POLL_S)
