"""SQL tables of authentication, on their own ``MetaData`` (created by the schema migrations,
:mod:`lepton.coordinator.store.migrations`, revision 0002).

- ``auth_tokens``: operator tokens by name: the SHA-256 of the secret (never the secret),
  scopes, expiry, revocation, last use.
- ``auth_claims``: enrolment claims: a secret's hash, how many enrolments it may still make,
  its expiry, and what it binds the device to (class, group).
- ``auth_devices``: one row per enrolled device: its HTTP token's hash, what its claim bound
  it to, its client certificate's serial, and when it was revoked.
- ``audit_log``: every mutating call, enrolment, revocation and refusal: who, what, when, the
  outcome.

Times are UNIX seconds as floats.
"""

from __future__ import annotations

from sqlalchemy import JSON, Column, Float, Index, Integer, MetaData, String, Table
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
NAME = 64
HASH = 64

tokens = Table(
    "auth_tokens",
    metadata,
    Column("name", String(NAME), primary_key=True),
    Column("token_hash", String(HASH), nullable=False, unique=True),
    Column("scopes", Json, nullable=False),  # sorted list of scope names
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("expires_at", Float),
    Column("revoked_at", Float),
    Column("last_used_at", Float),
)

claims = Table(
    "auth_claims",
    metadata,
    Column("name", String(NAME), primary_key=True),
    Column("token_hash", String(HASH), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("created_by", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("max_uses", Integer, nullable=False),
    Column("uses", Integer, nullable=False),
    Column("device_class", String(64)),
    Column("device_group", String(64)),
    Column("revoked_at", Float),
)

devices = Table(
    "auth_devices",
    metadata,
    Column("device_id", String(NAME), primary_key=True),
    Column("token_hash", String(HASH), nullable=False, unique=True),
    Column("claim", String(NAME), nullable=False),
    Column("device_class", String(64)),
    Column("device_group", String(64)),
    Column("cert_serial", String(64)),
    Column("enrolled_at", Float, nullable=False),
    Column("revoked_at", Float),
    Column("revoked_by", String(128)),
)

audit = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(128), nullable=False),  # operator:<name>, device:<id>, anonymous
    Column("action", String(64), nullable=False),  # POST /v1/tasks, enroll, revoke, refused
    Column("target", String(256), nullable=False),
    Column("outcome", String(32), nullable=False),  # ok, 4xx/5xx status, refused reason
    Column("remote", String(64), nullable=False),
    Column("detail", Json),
    Index("ix_audit_log_at", "at"),
)
