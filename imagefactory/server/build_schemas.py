"""Bodies of the build service endpoints (builds, builders, environments), as pydantic
models; they also make the OpenAPI document. Requests forbid unknown keys."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from imagefactory.server.blobs import DIGEST_PATTERN
from imagefactory.server.schemas import ID_PATTERN, INT64_MAX, Ident

PIPELINE_REF_PATTERN = ID_PATTERN.removesuffix("$") + r"(@sha256:[0-9a-f]{64})?$"
STAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,63}$"

BuildState = Literal["queued", "building", "succeeded", "failed", "cancelled"]
Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]
Stage = Annotated[str, StringConstraints(pattern=STAGE_PATTERN)]
ArtifactName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")]
LogLine = Annotated[str, StringConstraints(max_length=16384)]
Seconds = Annotated[float, Field(ge=0, le=10**9)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BuildRequest(Strict):
    """`POST /v1/builds`: what to build."""

    target: Ident
    format: Ident
    pipeline: Annotated[str, StringConstraints(pattern=PIPELINE_REF_PATTERN)] = Field(
        description="A gateway pipeline name, optionally pinned: NAME@sha256:HEX."
    )


class Artifact(Strict):
    name: ArtifactName
    digest: Digest
    size: int = Field(ge=0, le=INT64_MAX)


class Pushed(Strict):
    reference: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    digest: Digest
    plain_http: bool = Field(
        default=False,
        description="Set by the master: its registry speaks plain HTTP (serve --registry "
        "http://...), so pulls go without TLS.",
    )


class Build(BaseModel):
    build_id: str
    target: str
    format: str
    pipeline: str
    pipeline_sha256: str
    state: BuildState
    builder_id: str | None
    attempt: int = Field(
        description="The attempt the build is on: 1, raised each time an expired lease "
        "puts it back in the queue."
    )
    cancel_requested: bool
    stage: str | None = Field(description="The stage in progress while building.")
    stages: dict[str, float] = Field(description="Seconds per finished stage.")
    artifacts: list[Artifact]
    pushed: Pushed | None = Field(description="The registry push of an OCI environment.")
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


class BuilderInfo(BaseModel):
    builder_id: str
    targets: list[str]
    formats: list[str]
    last_seen: str


class ClaimRequest(Strict):
    """`POST /v1/builder/claim`: register what this builder can make, wait for a job."""

    targets: list[Ident] = Field(max_length=64)
    formats: list[Ident] = Field(max_length=64)
    wait_s: float = Field(default=20.0, ge=0, le=60, description="Long-poll at most this long.")


class Job(BaseModel):
    build: Build
    lease_s: float
    registry: str | None = Field(description="Where OCI environments are pushed.")


class LeaseBody(Strict):
    attempt: int = Field(ge=1, le=INT64_MAX)


class Progress(LeaseBody):
    """`POST /v1/builder/jobs/{build_id}/heartbeat`: renew the lease, report progress."""

    stage: Stage | None = None
    stages: dict[Stage, Seconds] = Field(default_factory=dict, max_length=256)
    log: list[LogLine] = Field(default_factory=list, max_length=4096)


class ProgressAck(BaseModel):
    cancel: bool = Field(description="Stop the bake: the build was cancelled.")


class UploadStart(LeaseBody):
    """`POST /v1/builder/jobs/{build_id}/uploads`: announce (or resume) an upload."""

    digest: Digest
    size: int = Field(ge=0, le=INT64_MAX)


class UploadStatus(BaseModel):
    digest: str
    size: int
    offset: int = Field(description="Bytes stored; the next chunk starts here.")
    complete: bool


class Finish(LeaseBody):
    """`POST /v1/builder/jobs/{build_id}/finish`: the outcome of the attempt."""

    state: Literal["succeeded", "failed", "cancelled"]
    stages: dict[Stage, Seconds] = Field(default_factory=dict, max_length=256)
    artifacts: list[Artifact] = Field(default_factory=list, max_length=64)
    pushed: Pushed | None = None
    error: Annotated[str, StringConstraints(max_length=16384)] | None = None


class Environment(BaseModel):
    build_id: str
    name: str
    digest: str
    size: int
    created_at: str
    target: str
    format: str
    pipeline: str
    pipeline_sha256: str


class PruneResult(BaseModel):
    removed: list[str]
    freed_bytes: int
