"""SQL tables of staged rollouts, on their own ``MetaData`` (created by the migration
``0004_rollouts``; see :mod:`lepton.coordinator.store.migrations`).

``rollouts``: one row per rollout, its plan as JSON and where it stands. ``rollout_devices``:
one row per device of a rollout, in rollout order (``seq``), with its state, the reason of its
last change, the step under way (``step``, ``task_id``: the task the device is working on)
and what a revert goes back to (``from_version``). Times are UNIX seconds as floats.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
ID_LENGTH = 64
REASON_LENGTH = 512

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("kind", String(16), nullable=False),  # agent | model
    Column("name", String(128), nullable=False),
    Column("version", String(32), nullable=False),
    Column("plan", Json, nullable=False),
    Column("state", String(32), nullable=False),
    Column("phase", Integer, nullable=False),
    Column("approved", Json, nullable=False),  # [phase index, ...]
    Column("revert", Boolean, nullable=False),
    Column("reason", String(REASON_LENGTH), nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("ended_at", Float),
    Index("ix_rollouts_state", "state"),
)

rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column(
        "rollout_id",
        String(ID_LENGTH),
        ForeignKey("rollouts.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("device_id", String(ID_LENGTH), primary_key=True),
    Column("seq", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("reason", String(REASON_LENGTH), nullable=False),
    Column("step", String(32)),  # baseline | deploy | probe | install | revert
    Column("task_id", String(ID_LENGTH)),
    Column("from_version", String(32)),
    Column("baseline", Json),  # models: the probe's baseline measurement
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    Index("ix_rollout_devices_task", "task_id"),
    Index("ix_rollout_devices_device", "device_id"),
)
