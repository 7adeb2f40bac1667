"""Baseline: the schema of the first release with migrations (devices, tasks, results,
throughput, leases; federated jobs; the model registry).

Written out in full, not generated at run time: a later change to the models must come with a
revision of its own, and tests/coordinator/store/test_models_match.py fails until it does.

On a database that a release before migrations made (tables from ``create_all``, no
``alembic_version``), this revision adopts what is there: it creates only the tables that
are missing (``fl_loads`` and ``fl_keys`` came late) and adds the nullable columns those
releases added at start-up (``tasks.cancel_*``, ``fl_rounds.reported_sizes``); rows are
kept. A table lacking any other column is refused: no previous release made it.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql
from sqlalchemy.schema import SchemaItem

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _devices() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("state_at", sa.Float(), nullable=False),
        sa.Column("offline_reason", sa.String(length=256), nullable=True),
        sa.Column("device_class", sa.String(length=64), nullable=True),
        sa.Column("device_model", sa.String(length=256), nullable=False),
        sa.Column("agent_version", sa.String(length=256), nullable=False),
        sa.Column("runtimes", JSON, nullable=False),
        sa.Column("accelerators", JSON, nullable=False),
        sa.Column("tags", JSON, nullable=False),
        sa.Column("groups", JSON, nullable=False),
        sa.Column("first_seen", sa.Float(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("report", JSON, nullable=True),
        sa.Column("report_ts", sa.Float(), nullable=False),
        sa.Column("report_interval_s", sa.Float(), nullable=True),
        sa.Column("reports", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    ]


def _fl_jobs() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("global_digest", sa.String(length=64), nullable=True),
        sa.Column("tensors", JSON, nullable=True),
        sa.Column("max_update_bytes", sa.BigInteger(), nullable=True),
        sa.Column("flops_per_example", sa.Float(), nullable=True),
        sa.Column("final_model", JSON, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    ]


def _fl_keys() -> list[SchemaItem]:
    return [
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    ]


def _fl_loads() -> list[SchemaItem]:
    return [
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("what", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("job_id"),
    ]


def _fl_updates() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("compression", sa.String(length=8), nullable=False),
        sa.Column("accepted_at", sa.Float(), nullable=False),
        sa.Column("result_id", sa.String(length=64), nullable=True),
        sa.Column("examples", sa.Integer(), nullable=True),
        sa.Column("metrics", JSON, nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "round", "device_id", name="uq_fl_updates_slot"),
    ]


def _leases() -> list[SchemaItem]:
    return [
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("holder", sa.String(length=128), nullable=False),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    ]


def _model_blobs() -> list[SchemaItem]:
    return [
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("digest"),
    ]


def _model_versions() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("precision", sa.String(length=8), nullable=False),
        sa.Column("inputs", JSON, nullable=False),
        sa.Column("outputs", JSON, nullable=False),
        sa.Column("param_count", sa.BigInteger(), nullable=True),
        sa.Column("flops", sa.BigInteger(), nullable=True),
        sa.Column("accuracy_fp32", sa.Float(), nullable=True),
        sa.Column("accuracy_int8", sa.Float(), nullable=True),
        sa.Column("eval_samples", sa.Integer(), nullable=True),
        sa.Column("calibration", JSON, nullable=True),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name", "digest", name="uq_model_versions_name_digest"),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    ]


def _results() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("output", JSON, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("applied", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    ]


def _tasks() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("fleet", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("model_class", sa.String(length=64), nullable=False),
        sa.Column("precision", sa.String(length=8), nullable=False),
        sa.Column("demand_gops", sa.Float(), nullable=False),
        sa.Column("input_bytes", sa.BigInteger(), nullable=False),
        sa.Column("output_bytes", sa.BigInteger(), nullable=False),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("runtime", sa.String(length=64), nullable=True),
        sa.Column("accelerator", sa.String(length=64), nullable=True),
        sa.Column("data_source", sa.String(length=64), nullable=True),
        sa.Column("min_battery", sa.Float(), nullable=True),
        sa.Column("pinned_device", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("assigned_at", sa.Float(), nullable=True),
        sa.Column("dispatch_id", sa.String(length=64), nullable=True),
        sa.Column("dispatched_at", sa.Float(), nullable=True),
        sa.Column("sends", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("result_id", sa.String(length=64), nullable=True),
        sa.Column("output", JSON, nullable=True),
        sa.Column("explanation", JSON, nullable=True),
        sa.Column("cancel_requested_at", sa.Float(), nullable=True),
        sa.Column("cancel_reason", sa.String(length=256), nullable=True),
        sa.Column("cancel_sent_at", sa.Float(), nullable=True),
        sa.Column("cancel_sends", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    ]


def _throughput_estimates() -> list[SchemaItem]:
    return [
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("snapshot", JSON, nullable=False),
        sa.Column("observations", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    ]


def _throughput_observations() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model_class", sa.String(length=64), nullable=False),
        sa.Column("precision", sa.String(length=8), nullable=False),
        sa.Column("demand_gops", sa.Float(), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    ]


def _capacity_history() -> list[SchemaItem]:
    return [
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("received_at", sa.Float(), nullable=False),
        sa.Column("report", JSON, nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    ]


def _fl_rounds() -> list[SchemaItem]:
    return [
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("selected", JSON, nullable=False),
        sa.Column("tokens", JSON, nullable=False),
        sa.Column("tasks", JSON, nullable=False),
        sa.Column("reported_sizes", JSON, nullable=True),
        sa.Column("selection", JSON, nullable=True),
        sa.Column("base_digest", sa.String(length=64), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("deadline", sa.Float(), nullable=False),
        sa.Column("closed_at", sa.Float(), nullable=True),
        sa.Column("new_digest", sa.String(length=64), nullable=True),
        sa.Column("strategy_state", JSON, nullable=True),
        sa.Column("contributors", JSON, nullable=True),
        sa.Column("rejects", JSON, nullable=False),
        sa.Column("metrics", JSON, nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["fl_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "round"),
    ]


def _task_attempts() -> list[SchemaItem]:
    return [
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("assigned_at", sa.Float(), nullable=False),
        sa.Column("acked_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_id", "attempt"),
    ]


# In creation order (referenced tables first).
TABLES: dict[str, Callable[[], list[SchemaItem]]] = {
    "devices": _devices,
    "fl_jobs": _fl_jobs,
    "fl_keys": _fl_keys,
    "fl_loads": _fl_loads,
    "fl_updates": _fl_updates,
    "leases": _leases,
    "model_blobs": _model_blobs,
    "model_versions": _model_versions,
    "results": _results,
    "tasks": _tasks,
    "throughput_estimates": _throughput_estimates,
    "throughput_observations": _throughput_observations,
    "capacity_history": _capacity_history,
    "fl_rounds": _fl_rounds,
    "task_attempts": _task_attempts,
}


INDEXES: dict[str, list[tuple[str, list[str], bool]]] = {
    "devices": [
        ("ix_devices_state_last_seen", ["state", "last_seen"], False),
    ],
    "fl_jobs": [
        ("ix_fl_jobs_state", ["state"], False),
    ],
    "model_versions": [
        ("ix_model_versions_digest", ["digest"], False),
    ],
    "results": [
        ("ix_results_task_id", ["task_id"], False),
    ],
    "tasks": [
        ("ix_tasks_created", ["created_at", "id"], False),
        ("ix_tasks_device_state", ["device_id", "state"], False),
        ("ix_tasks_state_next", ["state", "next_attempt_at"], False),
    ],
    "capacity_history": [
        ("ix_capacity_device_id", ["device_id", "id"], False),
    ],
}

# Nullable columns that releases before migrations added to existing tables at start-up; a
# database one of them made may lack them.
ADDED_AT_START_UP: dict[str, list[str]] = {
    "tasks": ["cancel_requested_at", "cancel_reason", "cancel_sent_at", "cancel_sends"],
    "fl_rounds": ["reported_sizes"],
}


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, items in TABLES.items():
        if name in existing:
            _adopt(name, items())
            continue
        op.create_table(name, *items())
        for index, columns, unique in INDEXES.get(name, []):
            op.create_index(index, name, columns, unique=unique)


def downgrade() -> None:
    for name in reversed(TABLES):
        op.drop_table(name)


def _adopt(name: str, items: list[SchemaItem]) -> None:
    """Bring table ``name``, made by a release before migrations, to this revision."""
    have = {c["name"] for c in sa.inspect(op.get_bind()).get_columns(name)}
    columns = {i.name: i for i in items if isinstance(i, sa.Column)}
    for column_name in ADDED_AT_START_UP.get(name, []):
        if column_name not in have:
            op.add_column(name, columns[column_name])
            have.add(column_name)
    missing = sorted(set(columns) - have)
    if missing:
        raise RuntimeError(
            f"table {name} lacks columns {', '.join(missing)}: no release this one can"
            " upgrade made this database"
        )
