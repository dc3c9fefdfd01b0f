"""Bodies of the device inventory endpoints (docs/devices.md), as pydantic models; they
also make the OpenAPI document. Requests forbid unknown keys; every string is bounded and
checked by imagefactory/reach.py, the same checks `imagefactory devices add` makes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

from imagefactory.kinds import ARCHS, KIND_NAMES, KINDS, get_kind
from imagefactory.reach import (
    CONTAINER_HOST_PATTERN,
    LIBVIRT_URI_PATTERN,
    LOCAL_CONTAINER_HOST,
    MASTER_URL_PATTERN,
    SSH_ADDRESS_PATTERN,
    check_container_host,
    check_libvirt_uri,
    check_master_url,
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
DETAIL_KEY_MAX = 128
DETAILS_MAX = 64


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


def _printable(text: str) -> bool:
    """No control characters, and valid UTF-8 (no lone surrogates, which no database or
    client could store or send on)."""
    return not any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in text)


def _check_details(details: object) -> object:
    """The deployment's details, checked as a whole so that a refusal names a bad key
    escaped (it may hold any character) rather than as pydantic's location."""
    if not isinstance(details, dict):
        return details  # the declared type refuses it
    if len(details) > DETAILS_MAX:
        raise invalid(f"more than {DETAILS_MAX} keys")
    for key, value in details.items():
        if not 0 < len(key) <= DETAIL_KEY_MAX or not _printable(key):
            raise invalid(f"key {key[:40]!r} is not 1-{DETAIL_KEY_MAX} printable characters")
        texts = value if isinstance(value, list) else [value]
        if len(texts) > DETAILS_MAX:
            raise invalid(f"{key}: more than {DETAILS_MAX} items")
        for text in texts:
            if not isinstance(text, str):
                raise invalid(f"{key}: not a string or a list of strings")
            if len(text) > DETAIL_TEXT_MAX or not _printable(text):
                raise invalid(f"{key}: not at most {DETAIL_TEXT_MAX} printable characters")
    return details


def _shape(pattern: str) -> Any:
    """The form in the OpenAPI document only: the reach.py check enforces it, with a
    message that says what is wrong rather than quoting the pattern."""
    return Field(json_schema_extra={"pattern": pattern})


LibvirtUri = Annotated[
    str,
    StringConstraints(max_length=2048),
    _checked(check_libvirt_uri),
    _shape(LIBVIRT_URI_PATTERN),
]
ContainerHost = Annotated[
    str,
    StringConstraints(max_length=512),
    _checked(check_container_host),
    _shape(CONTAINER_HOST_PATTERN),
]
SshAddress = Annotated[
    str,
    StringConstraints(max_length=512),
    _checked(check_ssh_address),
    _shape(SSH_ADDRESS_PATTERN),
]
MasterUrl = Annotated[
    str,
    StringConstraints(max_length=1024),
    _checked(check_master_url),
    _shape(MASTER_URL_PATTERN),
]
Fingerprint = Annotated[str, StringConstraints(pattern=FINGERPRINT_PATTERN)]
DetailKey = Annotated[str, StringConstraints(min_length=1, max_length=DETAIL_KEY_MAX)]
DetailText = Annotated[str, StringConstraints(max_length=DETAIL_TEXT_MAX)]
DetailList = Annotated[list[DetailText], Field(max_length=DETAILS_MAX)]
Details = Annotated[
    dict[DetailKey, DetailText | DetailList],
    Field(max_length=DETAILS_MAX),
    BeforeValidator(_check_details),
]


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


def _reach_required() -> dict[str, Any]:
    """JSON Schema for "each listed kind needs its reach object" (the validator below
    enforces it), so that the OpenAPI document says it too."""
    rules = [
        {
            "if": {"properties": {"kinds": {"contains": {"const": kind.name}}}},
            "then": {"required": [kind.reach], "properties": {kind.reach: {"type": "object"}}},
        }
        for kind in KINDS
    ]
    return {"allOf": rules}


class DeviceSpec(Strict):
    """`PUT /v1/devices/{device_id}`: what a device is and how to reach it."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_reach_required())

    arch: Ident = Field(
        json_schema_extra={"enum": list(ARCHS)},
        description="As the build targets spell it. Refused (400) unless a target of this "
        "architecture runs one of the kinds; the answer names what is supported.",
    )
    kinds: list[KindName] = Field(
        min_length=1,
        max_length=len(KIND_NAMES),
        json_schema_extra={"uniqueItems": True},
        description="In order of preference, each once.",
    )
    libvirt: LibvirtReach | None = None
    container: ContainerReach | None = None
    ssh: SshReach | None = None
    master_url: MasterUrl | None = Field(
        default=None,
        description="The master's URL as the device (for vm and container: its "
        "hypervisor or container host) reaches it, when that is not deploy's --master.",
    )

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
    details: Details = Field(
        default_factory=dict,
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
    master_url: str | None = None
    deployment: Deployment | None = Field(description="What deploy last put on the device.")
    created_at: str
    updated_at: str
