"""SQL tables of federated jobs, on their own ``MetaData`` (created next to the store's by the
schema migrations, :mod:`lepton.coordinator.store.migrations`).

- ``fl_jobs``: one row per job: its spec, state, the round it is at and the current global
  weights (a blob digest), the tensor layout updates must match, the final model.
- ``fl_rounds``: one row per (job, round): the devices selected (their update slots) and
  task ids, the sample count each selected device had reported for the job's data source
  when it was selected, the deadline as an absolute time, the global weights the round
  trains from, upload rejects by reason, and once closed the new weights, the strategy's
  state after the round (a blob digest) and the round's figures.
- ``fl_updates``: one row per accepted upload, unique on (job, round, device): a device's
  update is recorded once however often it is sent. ``result_id`` and ``examples`` are set
  when the device's train result has been applied too; only then does the update count.
- ``fl_loads``: one row per job whose code (model factory, evaluation set) the coordinator
  is running or was running when it died: ``attempts`` counts calls that never returned,
  written before each call and reset after it, so a job whose code kills the process is
  failed after a few restarts instead of crashing every one.
- ``fl_keys``: the coordinator's secret keys (the upload credential key), shared by every
  replica through the database.

Times are UNIX seconds as floats. JSON columns are JSONB on PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
ID = 64
DIGEST = 64

jobs = Table(
    "fl_jobs",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("spec", Json, nullable=False),  # FLJob.to_dict()
    # pending -> running -> done | failed | stopped; stopping while a stop is being applied
    Column("state", String(16), nullable=False),
    Column("round", Integer, nullable=False, default=0),  # the round in progress (or next)
    Column("global_digest", String(DIGEST)),  # weights the current round trains from
    Column("tensors", Json),  # {name: [shape...]} of the global weights
    Column("max_update_bytes", BigInteger),
    Column("flops_per_example", Float),
    Column("final_model", Json),  # {"name", "version", "digest", "format"}
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Index("ix_fl_jobs_state", "state"),
)

rounds = Table(
    "fl_rounds",
    metadata,
    Column("job_id", String(ID), ForeignKey("fl_jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("round", Integer, primary_key=True),
    Column("state", String(16), nullable=False),  # open | closed | failed | cancelled
    Column("attempt", Integer, nullable=False, default=1),  # extensions after a short deadline
    Column("selected", Json, nullable=False),  # [device ids], in selection order
    # {device id: how its uploads are authorised}: the selected devices' update slots. No
    # secret: the credential is derived from the slot (coordinator.federated.credentials).
    Column("tokens", Json, nullable=False),
    Column("tasks", Json, nullable=False),  # {device id: task id}
    # {device id: samples in the job's data source}, from the device's last capacity report
    # before it was selected; devices that reported none are absent. The count its update
    # is weighted by is clamped to it (coordinator.federated.screening).
    Column("reported_sizes", Json),
    Column("selection", Json),  # how they were chosen: expected times, forced...
    Column("base_digest", String(DIGEST), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("deadline", Float, nullable=False),  # absolute; survives restarts as is
    Column("closed_at", Float),
    Column("new_digest", String(DIGEST)),
    Column("strategy_state", Json),  # {"digest": blob} or {} when stateless
    Column("contributors", Json),  # device ids whose updates entered the aggregate
    Column("rejects", Json, nullable=False, default=dict),  # {reason: count} of uploads
    Column("metrics", Json),
)

updates = Table(
    "fl_updates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(ID), nullable=False),
    Column("round", Integer, nullable=False),
    Column("device_id", String(ID), nullable=False),
    Column("digest", String(DIGEST), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("compression", String(8), nullable=False),
    Column("accepted_at", Float, nullable=False),
    Column("result_id", String(ID)),
    Column("examples", Integer),
    Column("metrics", Json),
    UniqueConstraint("job_id", "round", "device_id", name="uq_fl_updates_slot"),
)

loads = Table(
    "fl_loads",
    metadata,
    Column("job_id", String(ID), primary_key=True),
    Column("attempts", Integer, nullable=False),  # calls begun and not (yet) returned
    Column("what", String(64), nullable=False),  # the last call begun: "prepare", "evaluate"...
    Column("started_at", Float, nullable=False),
)

keys = Table(
    "fl_keys",
    metadata,
    Column("name", String(ID), primary_key=True),
    Column("secret", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
)
