"""Request and response bodies of the HTTP API (they feed /openapi.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lepton.coordinator.store import AttemptRecord, DeviceRecord, ResultRecord, TaskRecord
from lepton.coordinator.tasks.request import TaskRequest
from lepton.coordinator.tasks.states import TaskState
from lepton.coordinator.tasks.submit import request_of

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:/-]+$")]
Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
TaskStateName = TaskState  # the API's name for the store's task states


class TaskSubmit(BaseModel):
    """A task to run somewhere in the fleet. Only ``kind`` is required.

    The body's schema for FastAPI and /openapi.json: the fields and bounds of
    :class:`~lepton.coordinator.tasks.request.TaskRequest` (a test keeps them alike), which the
    handler submits (:meth:`request`).
    """

    # NaN and infinities are refused as the JSON body is read; this keeps the model honest
    # for any other caller (and for 1e400, which JSON parses as infinity).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    kind: Name = Field(description='What to run, e.g. "echo" or "benchmark".')
    params: dict[str, Any] = Field(default_factory=dict, description="Arguments for the kind.")
    id: Ident | None = Field(default=None, description="Task id; generated when omitted.")
    model_class: Name = Field(default="generic", description="Throughput class for the estimator.")
    precision: Literal["fp32", "int8"] = "fp32"
    demand_gops: float = Field(default=1.0, ge=0, le=1e12, description="Compute demand, GOP.")
    input_bytes: int = Field(default=0, ge=0, le=2**53)
    output_bytes: int = Field(default=0, ge=0, le=2**53)
    memory_bytes: int = Field(default=0, ge=0, le=2**53)
    runtime: Name | None = Field(default=None, description="Required runtime (hard filter).")
    accelerator: Name | None = Field(default=None, description="Required accelerator.")
    data_source: Name | None = Field(default=None, description="Data the device must hold.")
    min_battery: float | None = Field(default=None, ge=0, le=100)
    device_id: Ident | None = Field(default=None, description="Pin the task to one device.")
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    expires_in_s: float | None = Field(
        default=None, gt=0, le=30 * 86400, description="Start deadline, seconds from now."
    )

    def request(self) -> TaskRequest:
        """The submission as the one task request type (:class:`SubmissionError` if it breaks
        a bound only the request checks)."""
        return request_of(self.model_dump())


class TaskCancelIn(BaseModel):
    """An optional body of a cancel: why (kept with the task and sent to its device)."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(
        default="requested",
        min_length=1,
        max_length=200,
        # One line of printable text: it is logged, stored and sent on.
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Why the task is cancelled.",
    )


class CapacitySummary(BaseModel):
    cpu_count: int | None = None
    cpu_percent: float | None = None
    memory_available: int | None = None
    memory_total: int | None = None
    slots_total: int | None = None
    slots_busy: int | None = None
    slots_queued: int | None = None
    temperature_c: float | None = None
    throttled: bool | None = None
    battery_percent: float | None = None
    fp32_gflops: float | None = None
    int8_gops: float | None = None

    @classmethod
    def of(cls, report: dict[str, Any] | None) -> CapacitySummary | None:
        if report is None:
            return None
        cpu, mem, slots = report.get("cpu", {}), report.get("memory", {}), report.get("slots", {})
        thermal, battery, bench = (
            report.get("thermal") or {},
            report.get("battery") or {},
            report.get("bench") or {},
        )
        return cls(
            cpu_count=cpu.get("count"),
            cpu_percent=cpu.get("percent"),
            memory_available=mem.get("available"),
            memory_total=mem.get("total"),
            slots_total=slots.get("total"),
            slots_busy=slots.get("busy"),
            slots_queued=slots.get("queued"),
            temperature_c=thermal.get("temperature_c"),
            throttled=thermal.get("throttled"),
            battery_percent=battery.get("percent"),
            fp32_gflops=bench.get("fp32_gflops"),
            int8_gops=bench.get("int8_gops"),
        )


class DeviceOut(BaseModel):
    id: str
    fleet: str
    state: Literal["online", "offline"]
    state_since: float
    offline_reason: str | None
    device_class: str | None
    device_model: str
    agent_version: str
    runtimes: list[str]
    accelerators: list[str]
    tags: list[str]
    groups: list[str]
    data_sources: list[str] = Field(description="Local data sets the device holds.")
    first_seen: float
    last_seen: float
    report_interval_s: float | None
    heartbeat_deadline: float | None = Field(
        description="When the device counts as offline without another report."
    )
    reports: int
    capacity: CapacitySummary | None

    @classmethod
    def of(cls, d: DeviceRecord, deadline_s: float) -> DeviceOut:
        return cls(
            id=d.id,
            fleet=d.fleet,
            state=d.state,
            state_since=d.state_at,
            offline_reason=d.offline_reason,
            device_class=d.device_class,
            device_model=d.device_model,
            agent_version=d.agent_version,
            runtimes=d.runtimes,
            accelerators=d.accelerators,
            tags=d.tags,
            groups=d.groups,
            data_sources=list((d.report or {}).get("data_sources") or []),
            first_seen=d.first_seen,
            last_seen=d.last_seen,
            report_interval_s=d.report_interval_s,
            heartbeat_deadline=d.last_seen + deadline_s if d.state == "online" else None,
            reports=d.reports,
            capacity=CapacitySummary.of(d.report),
        )


class DeviceDetail(DeviceOut):
    report: dict[str, Any] | None = Field(description="The latest capacity report, as sent.")
    tasks: list[TaskOut] = Field(description="Tasks assigned to or running on the device.")


class TaskOut(BaseModel):
    id: str
    kind: str
    state: TaskStateName
    device_id: str | None
    attempt: int
    max_attempts: int
    params: dict[str, Any]
    model_class: str
    precision: str
    demand_gops: float
    input_bytes: int
    output_bytes: int
    memory_bytes: int
    runtime: str | None
    accelerator: str | None
    data_source: str | None
    min_battery: float | None
    pinned_device: str | None
    created_at: float
    updated_at: float
    expires_at: float
    next_attempt_at: float | None
    assigned_at: float | None
    started_at: float | None
    finished_at: float | None
    last_error: str | None
    result_id: str | None
    output: dict[str, Any] | None
    cancel_requested_at: float | None = Field(
        default=None, description="When a cancel was asked for (the task ends when it took)."
    )
    cancel_reason: str | None = None

    @classmethod
    def of(cls, t: TaskRecord) -> TaskOut:
        out = cls.model_validate(t, from_attributes=True)
        if t.state != "pending":
            out.next_attempt_at = None  # only a pending task waits for its next attempt
        return out


class AttemptOut(BaseModel):
    attempt: int
    device_id: str
    assigned_at: float
    acked_at: float | None
    finished_at: float | None
    outcome: str | None
    error: str | None

    @classmethod
    def of(cls, a: AttemptRecord) -> AttemptOut:
        return cls(
            attempt=a.attempt,
            device_id=a.device_id,
            assigned_at=a.assigned_at,
            acked_at=a.acked_at,
            finished_at=a.finished_at,
            outcome=a.outcome,
            error=a.error,
        )


class ResultOut(BaseModel):
    id: str
    device_id: str
    attempt: int
    status: str
    applied: bool
    error: str | None
    started_at: float | None
    finished_at: float | None
    received_at: float

    @classmethod
    def of(cls, r: ResultRecord) -> ResultOut:
        return cls(
            id=r.id,
            device_id=r.device_id,
            attempt=r.attempt,
            status=r.status,
            applied=r.applied,
            error=r.error,
            started_at=r.started_at,
            finished_at=r.finished_at,
            received_at=r.received_at,
        )


class TaskDetail(TaskOut):
    attempts: list[AttemptOut]
    results: list[ResultOut]


class ExplainOut(BaseModel):
    task_id: str
    state: TaskStateName
    device_id: str | None
    explanation: dict[str, Any] | None = Field(
        description=(
            "The plan's reasoning when the task was last placed: the chosen device's cost "
            "terms next to the next best devices, and filtered devices with their reasons. "
            "Null until the task has been planned."
        )
    )


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    instance_id: str
    fleet: str
    version: str
    uptime_s: float
    leader: bool
    mqtt_connected: bool
    database: bool
    devices: dict[str, int]
    tasks: dict[str, int]
    ingest: dict[str, float]


DeviceDetail.model_rebuild()
