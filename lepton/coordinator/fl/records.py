"""Federated jobs, rounds and updates as plain values: what :class:`~.store.FLStore` takes
and returns, and the job states."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import RowMapping

JobStatus = Literal["pending", "running", "stopping", "stopped", "done", "failed"]
ACTIVE_STATES = ("pending", "running", "stopping")
FINISHED_STATES = ("stopped", "done", "failed")
RecordOutcome = Literal["accepted", "duplicate", "conflict", "closed", "not_selected", "unknown"]


@dataclass(frozen=True, slots=True, kw_only=True)
class JobRecord:
    id: str
    name: str
    spec: dict[str, Any]
    state: str
    round: int
    global_digest: str | None
    tensors: dict[str, list[int]] | None
    max_update_bytes: int | None
    flops_per_example: float | None
    final_model: dict[str, Any] | None
    error: str | None
    created_at: float
    updated_at: float
    finished_at: float | None

    @classmethod
    def of(cls, row: RowMapping) -> JobRecord:
        return cls(**{k: row[k] for k in cls.__slots__})


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundRecord:
    job_id: str
    round: int
    state: str
    attempt: int
    selected: list[str]
    tokens: dict[str, str]
    tasks: dict[str, str]
    selection: dict[str, Any] | None
    base_digest: str
    started_at: float
    deadline: float
    closed_at: float | None
    new_digest: str | None
    strategy_state: dict[str, Any] | None
    contributors: list[str] | None
    rejects: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    #: device -> samples it reported for the job's data source before it was selected.
    reported_sizes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, row: RowMapping) -> RoundRecord:
        data = {k: row[k] for k in cls.__slots__}
        data["rejects"] = data["rejects"] or {}
        data["reported_sizes"] = data["reported_sizes"] or {}
        return cls(**data)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateRecord:
    job_id: str
    round: int
    device_id: str
    digest: str
    size: int
    compression: str
    accepted_at: float
    result_id: str | None
    examples: int | None
    metrics: dict[str, Any] | None

    @property
    def complete(self) -> bool:
        """Both the upload and the device's result are recorded: the update counts."""
        return self.result_id is not None and self.examples is not None

    @classmethod
    def of(cls, row: RowMapping) -> UpdateRecord:
        return cls(**{k: row[k] for k in cls.__slots__})
