"""The device inventory endpoints (admin only; docs/devices.md): which devices exist, what
they run, how to reach them, and what deploy put on each.

The admin token is checked first (a dependency, which FastAPI runs before it validates
the body), so that a caller without it learns nothing about the schema.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from imagefactory.kinds import first_match, supported
from imagefactory.server.auth import Authority, bearer_token
from imagefactory.server.config import ServerConfig
from imagefactory.server.device_schemas import DeploymentSpec, Device, DeviceSpec
from imagefactory.server.device_store import DeviceStore
from imagefactory.server.schemas import ID_PATTERN

DeviceId = Annotated[str, Path(pattern=ID_PATTERN)]
Authorization = Annotated[str | None, Header()]
XNodeId = Annotated[str | None, Header(alias="X-Node-ID", pattern=ID_PATTERN)]


def device_router(config: ServerConfig, authority: Authority, store: DeviceStore) -> APIRouter:
    def admin(authorization: Authorization = None, x_node_id: XNodeId = None) -> None:
        authority.require_admin(bearer_token(authorization), x_node_id)

    router = APIRouter(dependencies=[Depends(admin)])

    async def device_or_404(device_id: str) -> dict[str, Any]:
        device = await run_in_threadpool(store.get, device_id)
        if device is None:
            raise HTTPException(404, f"no device {device_id}")
        return device

    @router.put("/v1/devices/{device_id}", response_model=Device, status_code=201,
                responses={200: {"model": Device}})  # fmt: skip
    async def put_device(device_id: DeviceId, body: DeviceSpec) -> JSONResponse:
        """Add a device (201) or replace it (200; its deployment is kept). Refused (400)
        when no build target runs any of its kinds on its architecture."""
        if first_match(body.arch, body.kinds, config.formats) is None:
            raise HTTPException(
                400,
                f"no target runs {'/'.join(body.kinds)} on {body.arch}: supported are "
                f"{supported(config.formats)}",
            )
        spec = body.model_dump(mode="json")
        device, created = await run_in_threadpool(store.put, device_id, spec)
        return JSONResponse(device, status_code=201 if created else 200)

    @router.get("/v1/devices", response_model=list[Device])
    async def list_devices() -> list[dict[str, Any]]:
        """Every device, by id, with its deployment."""
        return await run_in_threadpool(store.listing)

    @router.get("/v1/devices/{device_id}", response_model=Device)
    async def get_device(device_id: DeviceId) -> dict[str, Any]:
        """One device."""
        return await device_or_404(device_id)

    @router.delete("/v1/devices/{device_id}", status_code=204, response_class=Response)
    async def delete_device(device_id: DeviceId, if_undeployed: bool = False) -> Response:
        """Forget a device, also one with a deployment; with if_undeployed=true such a
        device is kept (409), decided atomically (`imagefactory devices remove` without
        --force)."""
        if await run_in_threadpool(store.delete, device_id, if_undeployed):
            return Response(status_code=204)
        if if_undeployed and await run_in_threadpool(store.get, device_id) is not None:
            raise HTTPException(409, f"device {device_id} has a deployment: undeploy it first")
        raise HTTPException(404, f"no device {device_id}")

    @router.put("/v1/devices/{device_id}/deployment", response_model=Device)
    async def put_deployment(
        device_id: DeviceId, body: DeploymentSpec, if_undeployed: bool = False
    ) -> dict[str, Any]:
        """Record what deploy put on the device (replaces the previous record); with
        if_undeployed=true only on a device without one, else 409, decided atomically
        (deploy reserves the device so before it places anything)."""
        spec = body.model_dump()
        device = await run_in_threadpool(store.set_deployment, device_id, spec, if_undeployed)
        if device is not None:
            return device
        if if_undeployed and (held := await run_in_threadpool(store.get, device_id)):
            node = held["deployment"]["node_id"]
            raise HTTPException(409, f"device {device_id} has a deployment (node {node})")
        raise HTTPException(404, f"no device {device_id}")

    @router.delete("/v1/devices/{device_id}/deployment", status_code=204, response_class=Response)
    async def delete_deployment(device_id: DeviceId) -> Response:
        """Clear the deployment record (undeploy removed what it named); 204 also when
        there was none."""
        if await run_in_threadpool(store.set_deployment, device_id, None) is None:
            raise HTTPException(404, f"no device {device_id}")
        return Response(status_code=204)

    return router
