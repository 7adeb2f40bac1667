"""SQL tables of the model registry, on their own ``MetaData``.

The coordinator's schema migrations (:mod:`lepton.coordinator.store.migrations`) create them
next to the store's own; nothing here imports the store. Times are UNIX seconds as floats (as
in the store and the wire protocol); JSON columns are JSONB on PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
DIGEST_LENGTH = 64
NAME_LENGTH = 128

blobs = Table(
    "model_blobs",
    metadata,
    Column("digest", String(DIGEST_LENGTH), primary_key=True),  # sha256, lowercase hex
    Column("size", BigInteger, nullable=False),
    Column("created_at", Float, nullable=False),
)

model_versions = Table(
    "model_versions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("version", Integer, nullable=False),  # 1, 2, ... per name
    Column("digest", String(DIGEST_LENGTH), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("format", String(16), nullable=False),  # onnx | tflite | torch
    Column("precision", String(8), nullable=False),  # fp32 | int8
    Column("inputs", Json, nullable=False),  # [{"name", "dtype", "shape"}]
    Column("outputs", Json, nullable=False),
    Column("param_count", BigInteger),
    Column("flops", BigInteger),  # estimate at batch 1
    Column("accuracy_fp32", Float),  # fraction on the evaluation set
    Column("accuracy_int8", Float),
    Column("eval_samples", Integer),
    Column("calibration", Json),  # CalibrationDetails of an INT8 model
    Column("parent_version", Integer),  # the FP32 version an INT8 model was made from
    Column("created_at", Float, nullable=False),
    UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    UniqueConstraint("name", "digest", name="uq_model_versions_name_digest"),
    Index("ix_model_versions_digest", "digest"),
)
