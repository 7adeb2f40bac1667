"""Tables of the coordinator's database (SQLAlchemy 2 typed declarative models).

Times are UNIX seconds as floats, like the wire protocol's timestamps. JSON columns hold
plain data (JSONB on PostgreSQL). The database is made and changed by the Alembic revisions
in :mod:`lepton.coordinator.store.migrations`: a change here needs a revision there.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Json = JSON().with_variant(JSONB(), "postgresql")
ID = 64


class Base(DeclarativeBase):
    pass


class DeviceRow(Base):
    """One device of the fleet: identity, liveness and its latest capacity report."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(ID))
    state: Mapped[str] = mapped_column(String(16), default="online")  # online | offline
    # When ``state`` last changed (reception time); a capacity report received before it
    # does not bring an offline device back.
    state_at: Mapped[float] = mapped_column(Float)
    offline_reason: Mapped[str | None] = mapped_column(String(256))
    device_class: Mapped[str | None] = mapped_column(String(ID))
    device_model: Mapped[str] = mapped_column(String(256), default="")
    agent_version: Mapped[str] = mapped_column(String(256), default="")
    runtimes: Mapped[list[str]] = mapped_column(Json, default=list)
    accelerators: Mapped[list[str]] = mapped_column(Json, default=list)
    tags: Mapped[list[str]] = mapped_column(Json, default=list)
    groups: Mapped[list[str]] = mapped_column(Json, default=list)
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any] | None] = mapped_column(Json)
    report_ts: Mapped[float] = mapped_column(Float, default=0.0)
    report_interval_s: Mapped[float | None] = mapped_column(Float)
    reports: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (Index("ix_devices_state_last_seen", "state", "last_seen"),)


class CapacityRow(Base):
    """Capacity history: the last N reports of each device (older ones are trimmed)."""

    __tablename__ = "capacity_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[float] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    report: Mapped[dict[str, Any]] = mapped_column(Json)

    __table_args__ = (Index("ix_capacity_device_id", "device_id", "id"),)


class TaskRow(Base):
    """A unit of work and where it is in its lifecycle.

    ``attempt`` counts assignments (0 before the first); ``dispatch_id`` is the wire id of the
    current attempt's Task message, so a re-send after a crash is the same message.
    """

    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(ID))
    kind: Mapped[str] = mapped_column(String(ID))
    params: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    # Cost model inputs (coordinator.scheduler.model.TaskSpec).
    model_class: Mapped[str] = mapped_column(String(ID), default="generic")
    precision: Mapped[str] = mapped_column(String(8), default="fp32")
    demand_gops: Mapped[float] = mapped_column(Float, default=1.0)
    input_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    output_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    runtime: Mapped[str | None] = mapped_column(String(ID))
    accelerator: Mapped[str | None] = mapped_column(String(ID))
    data_source: Mapped[str | None] = mapped_column(String(ID))
    min_battery: Mapped[float | None] = mapped_column(Float)
    pinned_device: Mapped[str | None] = mapped_column(String(ID))
    # Lifecycle.
    state: Mapped[str] = mapped_column(String(16), default="pending")
    device_id: Mapped[str | None] = mapped_column(String(ID))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    next_attempt_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)
    assigned_at: Mapped[float | None] = mapped_column(Float)
    dispatch_id: Mapped[str | None] = mapped_column(String(ID))
    dispatched_at: Mapped[float | None] = mapped_column(Float)
    sends: Mapped[int] = mapped_column(Integer, default=0)  # of the current attempt
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    last_error: Mapped[str | None] = mapped_column(Text)
    result_id: Mapped[str | None] = mapped_column(String(ID))
    output: Mapped[dict[str, Any] | None] = mapped_column(Json)
    explanation: Mapped[dict[str, Any] | None] = mapped_column(Json)
    # Cancellation of an assigned or running task: asked for at ``cancel_requested_at``;
    # the cancel was last sent at ``cancel_sent_at``, ``cancel_sends`` times. Nullable: the
    # baseline revision adds them to a database a release before them created.
    cancel_requested_at: Mapped[float | None] = mapped_column(Float)
    cancel_reason: Mapped[str | None] = mapped_column(String(256))
    cancel_sent_at: Mapped[float | None] = mapped_column(Float)
    cancel_sends: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_tasks_state_next", "state", "next_attempt_at"),
        Index("ix_tasks_device_state", "device_id", "state"),
        Index("ix_tasks_created", "created_at", "id"),
    )


class AttemptRow(Base):
    """Which device held which attempt of a task, and how it ended."""

    __tablename__ = "task_attempts"

    task_id: Mapped[str] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(String(ID))
    assigned_at: Mapped[float] = mapped_column(Float)
    acked_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    outcome: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)


class ResultRow(Base):
    """A result as received. The primary key is the result id: a replay inserts nothing."""

    __tablename__ = "results"

    id: Mapped[str] = mapped_column(String(ID), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(ID), index=True)
    device_id: Mapped[str] = mapped_column(String(ID))
    attempt: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    received_at: Mapped[float] = mapped_column(Float)
    applied: Mapped[bool] = mapped_column(Boolean)  # False: stale, kept for the record


class ObservationRow(Base):
    """A finished task's measured duration, waiting for the leader's throughput estimator."""

    __tablename__ = "throughput_observations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(ID))
    model_class: Mapped[str] = mapped_column(String(ID))
    precision: Mapped[str] = mapped_column(String(8))
    demand_gops: Mapped[float] = mapped_column(Float)
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float)


class EstimateRow(Base):
    """The throughput estimator's persisted snapshot."""

    __tablename__ = "throughput_estimates"

    name: Mapped[str] = mapped_column(String(ID), primary_key=True)
    snapshot: Mapped[dict[str, Any]] = mapped_column(Json)
    observations: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float)


class LeaseRow(Base):
    """A named lease (the scheduling leader's), taken and renewed by compare-and-set.

    ``epoch`` grows by one on every change of holder: a fencing token that leader-only writes
    check, so a paused ex-leader cannot write after another replica took over.
    """

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(ID), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[float] = mapped_column(Float)
    acquired_at: Mapped[float] = mapped_column(Float)
