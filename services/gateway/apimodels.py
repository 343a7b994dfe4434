"""The shapes of the HTTP API's bodies, as pydantic models: what /openapi.json publishes.

The handlers read and write these bodies themselves (a zip streams in, errors keep the
project's own messages instead of FastAPI's 422), so these models document them and
tests check real answers against them; they are not a validation layer. Every model
allows extra fields: a field is only ever added to an answer, never renamed or removed, so a client
written against an older schema keeps working.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


# ----- errors --------------------------------------------------------------------------


class ErrorDetail(_Open):
    code: str = Field(description="a stable wire code: not_found, invalid_request, conflict, build_failed, ...")
    message: str = Field(description="what went wrong and what to do")
    details: dict[str, Any] | None = Field(None, description="e.g. the build log's tail (log_tail) of a failed deploy")


class ErrorBody(_Open):
    error: ErrorDetail


# ----- functions -----------------------------------------------------------------------


class GroupRef(_Open):
    id: str
    version: int = Field(description="the group version that serves")
    tasks: list[str] = Field(description="the functions deployed together in this group (fused)")


class Replicas(_Open):
    desired: int
    ready: int


class Scaling(_Open):
    min_replicas: int = Field(description="spec.minReplicas (0: scaled to zero after spec.scaleToZero.idleTimeout)")
    max_replicas: int = Field(description="spec.maxReplicas: the autoscaler's ceiling")
    target_concurrency: int = Field(description="calls in flight per instance the autoscaler aims at"
                                    " (spec.targetConcurrency, default spec.maxConcurrency)")
    override: int | None = Field(description="replicas held by PUT /functions/{name}/replicas; null: autoscaled")


class ReplicasBody(_Open):
    replicas: int | None = Field(description="within spec.minReplicas (at least 1) and spec.maxReplicas; null gives"
                                 " the replicas back to the autoscaler", json_schema_extra={"example": 3})


class ReplicasResult(_Open):
    function: str
    group_id: str = Field(description="the group that scaled (a function scales with its fusion group)")
    override: int | None = Field(description="the count now held, or null: the autoscaler decides")
    replicas: int | None = Field(description="the group's replicas desired now (null when the override was cleared)")


class FunctionDescription(_Open):
    name: str
    id: str
    version: int | None = Field(description="the version that serves (None until one is ready)")
    latest_version: int
    latest_version_state: str | None
    state: str = Field(description="deploying, ready or failed")
    runtime: str | None
    handler: str | None
    description: str
    private: bool = Field(description="invocations need the token too")
    timeout_s: float
    group: GroupRef
    replicas: Replicas
    scaling: Scaling | None = None
    warnings: list[str]
    last_error: str | None
    created_at: str | None
    updated_at: str | None
    spec: dict[str, Any] = Field(description="the normalised function.yaml")


class ServiceFaasCreated(FunctionDescription):
    function_name: str = Field(description="the handler's name in python_file")
    status: Literal["running", "creating"]


class ZipUpload(BaseModel):
    zip_file: bytes = Field(description="the function's zip (function.yaml and code); any field name is taken")


class PythonFileUpload(BaseModel):
    python_file: bytes = Field(description="one Python source file")
    function_name: str = Field(description="the function in python_file to call, e.g. handle")
    name: str | None = Field(None, description="the function's name (default: from the file's, plus a suffix)")


# ----- invocations -----------------------------------------------------------------------


class AsyncAccepted(_Open):
    call_id: str
    status_url: str = Field(description="GET it for the call's status and result")
    duplicate: bool = Field(description="an earlier call had the same X-Idempotency-Key: this is its id")


class ExecuteRequest(BaseModel):
    payload: Any = Field(description="handed to handle(payload) as a string (a non-string is sent as JSON)")


# ----- calls ----------------------------------------------------------------------------


class CallTimings(_Open):
    queued: str | None
    started: str | None
    finished: str | None
    next_attempt: str | None


class Call(_Open):
    id: str
    function: str
    status: Literal["PENDING", "RUNNING", "DONE", "FAILED", "DEAD"]
    kind: str = Field(description="async, or sync for a record of a sync call")
    source: str = Field(description="http, zmq, topic, cron or call")
    attempts: int
    max_attempts: int
    parent_id: str | None = Field(description="the calling call, for a task-to-task call")
    cold_start: bool
    timings: CallTimings
    queued_ts: float = Field(description="seconds since the epoch; page with GET /calls?before=")
    duration_s: float | None
    error: str | None
    result_status: int | None
    result: Any = Field(None, description="the result: JSON, text, or {content_type, size} for other bodies")
    result_content_type: str | None = None
    trace_id: str | None = Field(None, description="its W3C trace (GET /traces/{trace_id}); null for calls recorded"
                                                   " before calls had one")
    fused: bool = Field(False, description="an in-process task call (caller and callee in one fusion group)")


class TraceCall(_Open):
    id: str
    function: str
    span_id: str = Field(description="its W3C span id (16 hex digits, derived from the call id)")
    parent_id: str | None = Field(description="the calling call, for a task-to-task call")
    parent_span: str | None = Field(description="the caller's span: the traceparent's parent id for a call from"
                                                " outside, the calling call's span for a task call; null for a root")
    status: Literal["PENDING", "RUNNING", "DONE", "FAILED", "DEAD"]
    result_status: int | None
    mode: Literal["fused", "remote"] = Field(description="fused: in-process in the caller's group; remote: through"
                                                         " the gateway")
    kind: str = Field(description="async, or sync")
    source: str = Field(description="http, zmq, topic, cron or call")
    started: str | None
    started_ts: float | None = Field(description="seconds since the epoch")
    duration_ms: float | None = Field(description="null until it finished")
    error: str | None
    children: list["TraceCall"] = Field(description="the task calls it made, oldest first")


class Trace(_Open):
    trace_id: str
    calls: int = Field(description="calls in the trace (at most 1000 are read)")
    truncated: bool = Field(description="the trace has more than 1000 calls; the oldest 1000 are shown")
    roots: list[TraceCall] = Field(description="the calls with no recorded caller: the entry call, usually one")


class PurgeResult(_Open):
    purged: int


# ----- runtimes -------------------------------------------------------------------------


class RuntimeBody(BaseModel):
    image: str = Field(description="an image in the local Docker Engine (nothing is pulled), e.g. myruntime:1")
    path: str = Field(description="the directory in the image the function's files go to, e.g. /ws")
    dependencies: list[str] | None = Field(None, description="argv run once per build, e.g. pip3 install -r ...")
    run: list[str] = Field(description="argv that serves the function, e.g. python3 main.py")


class Runtime(_Open):
    name: str
    image: str
    image_id: str
    path: str
    dependencies: list[str] | None
    run: list[str]
    created_at: str | None
    updated_at: str | None


# ----- fusion ---------------------------------------------------------------------------


class GroupSummary(_Open):
    id: str
    tasks: list[str]
    version: int
    ready_version: int | None
    state: str
    error: str | None
    replicas: Replicas


class Regroup(_Open):
    id: int
    setup: list[list[str]]
    state: str = Field(description="deploying, done, failed, superseded or cancelled")
    error: str | None
    failed_tasks: list[str]
    log_tail: str
    groups: list[GroupSummary] = Field(description="the groups being deployed for it")
    created_at: str | None
    updated_at: str | None


class GroupsState(_Open):
    setup: list[list[str]] = Field(description="the fusion setup in force")
    groups: list[GroupSummary]
    regroup: Regroup | None = Field(description="the latest change of setup, under way or finished")


class CallGraphEdge(_Open):
    caller: str = Field(description="the calling function")
    callee: str = Field(description="the function it called (context.call)")
    calls: int = Field(description="task calls from caller to callee within the window")
    fused: int = Field(description="of them, calls that ran in-process (caller and callee in one fusion group)")
    remote: int = Field(description="of them, calls that went through the gateway")
    sync: int = Field(description="of them, synchronous calls (the caller waited for the answer)")
    mean_ms: float | None = Field(description="mean duration of the synchronous calls; null without any")


class OptimizerStatus(_Open):
    strategy: str
    state: str
    rounds: list[dict[str, Any]] = Field(description="its decisions, each with the setup, reason and evidence")
    current_setup: list[list[str]]
    best_setup: list[list[str]] | None
    best_median_ms: float | None
    updated_at: float | None = None
    traced: dict[str, Any] | None = Field(None, description="entry calls and call edges heard since the optimizer"
                                          " started, and the PUB endpoints of the gateways it follows")
    scaling: dict[str, Any] | None = Field(None, description="the autoscaler: its windows, per group the decision"
                                           " and its evidence (observed, stable and panic concurrency, panic, desired,"
                                           " current, ready, reason), and the latest replica changes")
    graph: list[CallGraphEdge] | None = Field(None, description="the call graph: task-call edges summed over the"
                                              " last graph_window_s seconds, busiest first, at most 200")
    graph_window_s: float | None = Field(None, description="how far back graph sums the traced edges")


# ----- system ---------------------------------------------------------------------------


class Health(_Open):
    gateway: bool
    store: bool
    deployer: bool
    status: Literal["ok", "degraded"]
    error: str | None = None
    gateway_id: str = Field("", description="the boot id of the gateway that answered")
    gateways: int = Field(1, description="live gateways this one knows of, itself included")


class RootInfo(_Open):
    name: str
    version: str = Field(description="the gateway's nuclide version")
    docs: str
    health: str
    ui: str = Field(description="the web dashboard")
