"""Bodies of the device inventory endpoints (docs/devices.md), as pydantic models; they
also make the OpenAPI document. Requests forbid unknown keys; every string is bounded and
checked by imagefactory/reach.py, the same checks `imagefactory devices add` makes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator
from pydantic_core import PydanticCustomError

from imagefactory.kinds import KIND_NAMES, get_kind
from imagefactory.reach import (
    LOCAL_CONTAINER_HOST,
    check_container_host,
    check_libvirt_uri,
    check_runtime,
    check_ssh_address,
)
from imagefactory.server.blobs import DIGEST_PATTERN
from imagefactory.server.build_schemas import Strict
from imagefactory.server.schemas import Ident

KindName = Literal["vm", "container", "baremetal"]
Runtime = Literal["runc", "docker", "podman"]
FINGERPRINT_PATTERN = r"^SHA256:[A-Za-z0-9+/]{43}$"
DETAIL_TEXT_MAX = 4096


def _checked(check: Callable[[str], str]) -> AfterValidator:
    """A reach.py check as a validator whose message is the check's own line (pydantic
    would prefix a ValueError's with "Value error, ")."""

    def run(text: str) -> str:
        try:
            return check(text)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    return AfterValidator(run)


def invalid(reason: str) -> PydanticCustomError:
    """A validation error that reads as `reason` alone."""
    return PydanticCustomError("invalid", "{reason}", {"reason": reason})


def _printable(text: str) -> str:
    """No control characters, and valid UTF-8 (no lone surrogates, which no database or
    client could store or send on)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise invalid("control characters and lone surrogates are not allowed")
    return text


LibvirtUri = Annotated[str, StringConstraints(max_length=2048), _checked(check_libvirt_uri)]
ContainerHost = Annotated[str, StringConstraints(max_length=512), _checked(check_container_host)]
SshAddress = Annotated[str, StringConstraints(max_length=512), _checked(check_ssh_address)]
Fingerprint = Annotated[str, StringConstraints(pattern=FINGERPRINT_PATTERN)]
DetailKey = Annotated[
    str, StringConstraints(min_length=1, max_length=128), AfterValidator(_printable)
]
DetailText = Annotated[
    str, StringConstraints(max_length=DETAIL_TEXT_MAX), AfterValidator(_printable)
]
DetailList = Annotated[list[DetailText], Field(max_length=64)]


class LibvirtReach(Strict):
    uri: LibvirtUri = Field(
        description="`qemu:///system`, or `qemu+ssh://[user@]host[:port]/system[?keyfile=...]`."
    )
    pool: Ident = Field(default="default", description="The storage pool images go to.")


class ContainerReach(Strict):
    host: ContainerHost = Field(
        default=LOCAL_CONTAINER_HOST,
        description="`local` (the machine deploy runs on), or `ssh://[user@]host[:port]`.",
    )
    runtime: Runtime = Field(default="runc", description="runc runs on `local` only.")

    @model_validator(mode="after")
    def _runtime_fits_host(self) -> ContainerReach:
        try:
            check_runtime(self.host, self.runtime)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        return self


class SshReach(Strict):
    address: SshAddress = Field(
        description="`user@host[:port]`, as `imagefactory install --ssh` takes it."
    )
    host_key_fingerprint: Fingerprint | None = Field(
        default=None, description="The device's SSH host key (`ssh-keygen -lf`)."
    )


class DeviceSpec(Strict):
    """`PUT /v1/devices/{device_id}`: what a device is and how to reach it."""

    arch: Ident = Field(description="As the build targets spell it: x86_64, aarch64.")
    kinds: list[KindName] = Field(
        min_length=1, max_length=len(KIND_NAMES), description="In order of preference."
    )
    libvirt: LibvirtReach | None = None
    container: ContainerReach | None = None
    ssh: SshReach | None = None

    @model_validator(mode="after")
    def _each_kind_is_reachable(self) -> DeviceSpec:
        if len(set(self.kinds)) != len(self.kinds):
            raise invalid(f"kinds {self.kinds} name a kind twice")
        for kind in self.kinds:
            reach = get_kind(kind).reach
            if getattr(self, reach) is None:
                raise invalid(f"kind {kind} needs {reach!r}: how to reach the device")
        return self


class DeploymentSpec(Strict):
    """`PUT /v1/devices/{device_id}/deployment`: what deploy put on the device."""

    kind: KindName
    target: Ident
    environment: Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]
    node_id: Ident
    run_id: Ident
    details: dict[DetailKey, DetailText | DetailList] = Field(
        default_factory=dict,
        max_length=64,
        description="What undeploy needs to remove it (transport-specific, opaque here).",
    )


class Deployment(BaseModel):
    kind: KindName
    target: str
    environment: str
    node_id: str
    run_id: str
    details: dict[str, str | list[str]]
    deployed_at: str


class Device(BaseModel):
    id: str
    arch: str
    kinds: list[KindName]
    libvirt: LibvirtReach | None
    container: ContainerReach | None
    ssh: SshReach | None
    deployment: Deployment | None = Field(description="What deploy last put on the device.")
    created_at: str
    updated_at: str
