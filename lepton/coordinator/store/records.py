"""Plain values the store takes and returns; no database session ever leaks out of it."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import msgspec

from lepton.coordinator.tasks.states import TERMINAL, TaskState
from lepton.protocol.messages import CapacityReport, Task

DeviceStateName = Literal["online", "offline"]

R = TypeVar("R")


def from_row(cls: type[R], row: Any) -> R:
    """Build a record from an ORM row whose attributes share the record's field names."""
    assert dataclasses.is_dataclass(cls)
    return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord:
    id: str
    fleet: str
    state: DeviceStateName
    state_at: float
    offline_reason: str | None
    device_class: str | None
    device_model: str
    agent_version: str
    runtimes: list[str]
    accelerators: list[str]
    tags: list[str]
    groups: list[str]
    first_seen: float
    last_seen: float
    report: dict[str, Any] | None
    report_ts: float
    report_interval_s: float | None
    reports: int

    def capacity(self) -> CapacityReport | None:
        """The latest capacity report as a typed message (None before the first one)."""
        if self.report is None:
            return None
        return msgspec.convert(self.report, CapacityReport)


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacitySample:
    """One capacity report as the registry writes it."""

    device_id: str
    fleet: str
    report: dict[str, Any]
    report_ts: float
    interval_s: float
    device_class: str | None
    device_model: str
    runtimes: list[str]
    accelerators: list[str]
    tags: list[str]
    received_at: float

    @classmethod
    def from_report(
        cls, device_id: str, fleet: str, report: CapacityReport, received_at: float
    ) -> CapacitySample:
        return cls(
            device_id=device_id,
            fleet=fleet,
            report=msgspec.to_builtins(report),
            report_ts=report.ts,
            interval_s=report.interval_s,
            device_class=report.device_class,
            device_model=report.device_model,
            runtimes=list(report.runtimes),
            accelerators=list(report.accelerators),
            tags=list(report.tags),
            received_at=received_at,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CapacityPoint:
    ts: float
    received_at: float
    report: dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class NewTask:
    """A task as submitted: what to run, its cost-model inputs and its retry budget."""

    id: str
    fleet: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    model_class: str = "generic"
    precision: Literal["fp32", "int8"] = "fp32"
    demand_gops: float = 1.0
    input_bytes: int = 0
    output_bytes: int = 0
    memory_bytes: int = 0
    runtime: str | None = None
    accelerator: str | None = None
    data_source: str | None = None
    min_battery: float | None = None
    pinned_device: str | None = None
    max_attempts: int = 3
    expires_at: float
    created_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskRecord:
    id: str
    fleet: str
    kind: str
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
    state: TaskState
    device_id: str | None
    attempt: int
    max_attempts: int
    next_attempt_at: float
    expires_at: float
    created_at: float
    updated_at: float
    assigned_at: float | None
    dispatch_id: str | None
    dispatched_at: float | None
    sends: int
    started_at: float | None
    finished_at: float | None
    last_error: str | None
    result_id: str | None
    output: dict[str, Any] | None
    explanation: dict[str, Any] | None
    # Set when a cancel was asked for; an assigned or running task stays so until its device
    # answers (any result, or a refusal), then it is ``cancelled``.
    cancel_requested_at: float | None
    cancel_reason: str | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


@dataclass(frozen=True, slots=True, kw_only=True)
class AttemptRecord:
    task_id: str
    attempt: int
    device_id: str
    assigned_at: float
    acked_at: float | None
    finished_at: float | None
    outcome: str | None
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultRecord:
    id: str
    task_id: str
    device_id: str
    attempt: int
    status: str
    output: dict[str, Any]
    error: str | None
    started_at: float | None
    finished_at: float | None
    received_at: float
    applied: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Assignment:
    """One placement the scheduler chose, with the explanation to keep."""

    task_id: str
    device_id: str
    explanation: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Dispatch:
    """A Task message to publish to one device (built from a committed assignment)."""

    task_id: str
    device_id: str
    attempt: int
    message: Task


#: ``cancelled``: the answer of a device to a cancel (a result of the attempt it held, of
#: any status): stored, not applied, and the task ends ``cancelled``.
ResultOutcomeName = Literal[
    "applied", "stale", "replayed", "spoofed", "unknown_task", "unknown_device", "cancelled"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultOutcome:
    """What happened to one received result; ``ack`` says whether to acknowledge it."""

    result_id: str
    task_id: str
    device_id: str
    outcome: ResultOutcomeName
    task_state: str | None = None
    task_kind: str | None = None

    @property
    def ack(self) -> bool:
        # Only what is durably recorded is acknowledged: the agent drops acknowledged results.
        return self.outcome in ("applied", "stale", "replayed", "cancelled")


AckOutcomeName = Literal[
    "running", "retry", "failed", "expired", "cancelled", "ignored", "spoofed", "unknown_task"
]


@dataclass(frozen=True, slots=True, kw_only=True)
class AckOutcome:
    task_id: str
    outcome: AckOutcomeName
    task_state: str | None = None


CancelOutcomeName = Literal["cancelled", "requested", "finished", "unknown"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelOutcome:
    """What a cancel did to one task: ``cancelled`` (it was pending, or cancelled already:
    now ``cancelled``), ``requested`` (assigned or running: its device is told, and the task
    ends ``cancelled`` when the device answers), ``finished`` (it had ended otherwise; its
    ``state`` says how) or ``unknown`` (no such task)."""

    task_id: str
    outcome: CancelOutcomeName
    state: TaskState | None = None
    device_id: str | None = None
    changed: bool = False  # this request changed the task (a repeat changes nothing)


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelSend:
    """A cancel to send to the device holding a task whose cancel it has not answered."""

    task_id: str
    device_id: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    id: int
    device_id: str
    model_class: str
    precision: str
    demand_gops: float
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Lease:
    """A lease this process holds: ``epoch`` is the fencing token of its tenure."""

    name: str
    holder: str
    epoch: int
    expires_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Exponential backoff between attempts: ``base_s * 2**(attempt-1)``, capped, jittered
    down by up to ``jitter`` (a fraction) so retries of a burst spread out."""

    base_s: float = 5.0
    max_s: float = 300.0
    jitter: float = 0.2

    def delay(self, attempt: int) -> float:
        raw = min(self.max_s, self.base_s * 2.0 ** max(attempt - 1, 0))
        return raw * (1.0 - self.jitter * random.random())
