"""SQL tables of the release registry, on their own ``MetaData``.

Created by the migration ``0003_releases``; nothing here imports the store. A release is one
signed manifest (``manifest_digest``, the sha256 of its DSSE envelope, which the blob store
holds); a name and version may have several, for disjoint device classes. ``release_files``
lists every file of each, indexed by sha256: a device's blob grant looks a file up there.
``device_updates`` keeps the last :class:`~lepton.protocol.messages.UpdateStatus` each device
reported.
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
    MetaData,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB

metadata = MetaData()

Json = JSON().with_variant(JSONB(), "postgresql")
DIGEST_LENGTH = 64
NAME_LENGTH = 64
VERSION_LENGTH = 32

releases = Table(
    "releases",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),  # agent | model
    Column("name", String(NAME_LENGTH), nullable=False),
    Column("version", String(VERSION_LENGTH), nullable=False),
    Column("device_classes", Json, nullable=False),  # [fnmatch pattern]
    Column("manifest_digest", String(DIGEST_LENGTH), nullable=False),
    Column("manifest_size", Integer, nullable=False),
    Column("security_floor", String(VERSION_LENGTH), nullable=False),
    Column("created", Float, nullable=False),  # the manifest's own times (UNIX seconds)
    Column("expires", Float, nullable=False),
    Column("published_at", Float, nullable=False),
    Column("published_by", String(128), nullable=False),
    Column("file_count", Integer, nullable=False),
    Column("total_bytes", BigInteger, nullable=False),
    UniqueConstraint(
        "name", "version", "manifest_digest", name="uq_releases_name_version_manifest"
    ),
    Index("ix_releases_manifest_digest", "manifest_digest"),
)

release_files = Table(
    "release_files",
    metadata,
    Column(
        "release_id",
        Integer,
        ForeignKey("releases.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("path", String(255), primary_key=True),
    Column("sha256", String(DIGEST_LENGTH), nullable=False),
    Column("length", BigInteger, nullable=False),
    Index("ix_release_files_sha256", "sha256"),
)

device_updates = Table(
    "device_updates",
    metadata,
    Column("device_id", String(64), primary_key=True),
    Column("version", String(VERSION_LENGTH), nullable=False),
    Column("outcome", String(16), nullable=False),
    Column("target", String(VERSION_LENGTH), nullable=False),
    Column("reason", String(256), nullable=False),
    Column("slot", String(1), nullable=False),
    Column("floor", String(VERSION_LENGTH), nullable=False),
    Column("task_id", String(64), nullable=True),
    Column("at", Float, nullable=False),  # the device's clock
    Column("received_at", Float, nullable=False),
)
