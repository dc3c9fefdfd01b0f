"""Request and response bodies of the v1 API, as pydantic models (they also make the OpenAPI
document). Reports allow extra keys: the stored report is the JSON the node sent."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
INT64_MAX = 2**63 - 1
"""Counters are stored as 64-bit integers; a larger one is a bad request, not a failed commit."""
TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"

Ident = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Timestamp = Annotated[str, StringConstraints(pattern=TIME_PATTERN)]
TaskId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]+$")]

NodeState = Literal["starting", "running", "reporting", "done", "failed"]
RunStatus = Literal["succeeded", "failed", "cancelled"]
TaskStatus = Literal["succeeded", "failed", "upstream_failed", "cancelled"]


class Heartbeat(BaseModel):
    """`POST /v1/nodes/{node_id}/heartbeats`: a node is alive and how far its run is."""

    model_config = ConfigDict(extra="forbid")

    run_id: Ident
    seq: int = Field(ge=0, le=INT64_MAX, description="Increases with every heartbeat of a run.")
    state: NodeState
    tasks_done: int = Field(ge=0, le=INT64_MAX)
    tasks_total: int = Field(ge=0, le=INT64_MAX)
    interval_s: float = Field(gt=0, le=86400, description="The node's heartbeat interval.")
    sent_at: Timestamp


class TaskError(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    message: str
    traceback: str | None = None


class TaskResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: TaskStatus
    attempts: int = Field(ge=0)
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_s: float | None
    result: Any = None
    error: TaskError | None = None


class Report(BaseModel):
    """`PUT /v1/runs/{run_id}/report`: the results JSON of a run plus its combined log."""

    model_config = ConfigDict(extra="allow")

    run_id: Ident
    node_id: Ident
    pipeline: str
    status: RunStatus
    started_at: Timestamp
    finished_at: Timestamp
    tasks: dict[TaskId, TaskResult]
    log: str


class ReportAck(BaseModel):
    run_id: str
    stored: Literal["created", "unchanged"]


class NodeStatus(BaseModel):
    node_id: str
    run_id: str
    state: NodeState
    last_seen: str
    alive: bool = Field(description="The last heartbeat is younger than 3 x its interval_s.")
    tasks_done: int
    tasks_total: int


class RunSummary(BaseModel):
    run_id: str
    node_id: str
    pipeline: str
    status: RunStatus
    started_at: str
    finished_at: str
    received_at: str


class PipelineAck(BaseModel):
    name: str
    sha256: str
    size: int


class ErrorBody(BaseModel):
    error: str
