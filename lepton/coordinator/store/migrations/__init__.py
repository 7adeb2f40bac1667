"""Schema migrations of the coordinator's database (Alembic), and the start-up check.

The revisions live in ``versions/`` next to this file and ship inside the package: the
Alembic configuration is built here (``script_location`` is this folder), so no
``alembic.ini`` is needed. The database records its revision in ``alembic_version``.

What a database can be (:func:`status`):

- ``empty``: none of the coordinator's tables. Start-up brings it to head: the zero-setup
  default (a fresh SQLite file) keeps working, with its revision recorded.
- ``current``: at the head revision this release knows.
- ``behind``: at an older revision; ``unversioned``: tables made by a release before
  migrations, no revision. Start-up refuses with :class:`SchemaError` (which says what to
  run) unless ``[database] auto_upgrade`` is on; ``lepton db upgrade`` brings either to head.
- ``ahead``: at a revision this release does not know: the coordinator is older than the
  database, and refuses.

Every step runs in one transaction that first takes the start-up lock (a PostgreSQL advisory
lock; SQLite's ``BEGIN IMMEDIATE``), so replicas starting together upgrade once and the
others find it done.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, MetaData, inspect, text

from lepton.common.errors import LeptonError

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).resolve().parent
VERSION_TABLE = "alembic_version"
# The key of the PostgreSQL advisory lock every start-up takes (the store's since before
# migrations: a replica of the previous release and one of this serialise too).
STARTUP_LOCK = 74201

State = Literal["empty", "current", "behind", "unversioned", "ahead"]


class SchemaError(LeptonError):
    """The database is not at the schema this release runs; the message says what to do."""


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    state: State
    revision: str | None  # what the database records (None: nothing)
    head: str  # what this release runs


@cache
def target_metadata() -> MetaData:
    """Every table of the coordinator's database, as the models declare them (one
    ``MetaData``): the store's, federated jobs', the model registry's, authentication's,
    releases' and rollouts'."""
    from lepton.coordinator.auth import tables as auth_tables
    from lepton.coordinator.fl import tables as fl_tables
    from lepton.coordinator.model_registry import tables as registry_tables
    from lepton.coordinator.releases import tables as release_tables
    from lepton.coordinator.rollouts import tables as rollout_tables
    from lepton.coordinator.store.schema import Base

    merged = MetaData()
    for metadata in (
        Base.metadata,
        fl_tables.metadata,
        registry_tables.metadata,
        auth_tables.metadata,
        release_tables.metadata,
        rollout_tables.metadata,
    ):
        for table in metadata.tables.values():
            table.to_metadata(merged)
    return merged


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the shipped revisions; ``connection`` is the one
    ``env.py`` migrates."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.attributes["connection"] = connection
    return cfg


@cache
def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def revision_number(revision: str) -> int:
    """The number a revision id starts with (``"0003_releases"`` -> 3)."""
    return int(revision.split("_", 1)[0])


def head() -> str:
    """The newest revision this release knows."""
    rev = scripts().get_current_head()
    assert rev is not None, "no revisions shipped"
    return rev


def status(conn: Connection) -> SchemaStatus:
    """Where the database on ``conn`` stands against this release's revisions."""
    recorded = MigrationContext.configure(conn).get_current_revision()
    top = head()
    if recorded is None:
        ours = set(inspect(conn).get_table_names()) & set(target_metadata().tables)
        return SchemaStatus("unversioned" if ours else "empty", None, top)
    if recorded == top:
        return SchemaStatus("current", recorded, top)
    try:
        known = scripts().get_revision(recorded) is not None
    except CommandError:
        known = False
    return SchemaStatus("behind" if known else "ahead", recorded, top)


@contextmanager
def locked(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the start-up lock."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": STARTUP_LOCK})
        # SQLite: the write engine began with BEGIN IMMEDIATE, which serialises writers.
        yield conn


def current(engine: Engine) -> SchemaStatus:
    with engine.connect() as conn:
        return status(conn)


def upgrade(engine: Engine, revision: str = "head") -> tuple[SchemaStatus, SchemaStatus]:
    """Bring the database to ``revision`` (an empty or unversioned one too); returns the
    status before and after. Refuses a database newer than this release."""
    with locked(engine) as conn:
        before = status(conn)
        if before.state == "ahead":
            raise SchemaError(_message(before, engine))
        if before.state != "current" or revision != "head":
            log.info(
                "upgrading the database from %s to %s",
                before.revision or before.state,
                revision,
            )
            command.upgrade(alembic_config(conn), revision)
        after = status(conn)
    return before, after


def prepare(
    engine: Engine, *, auto_upgrade: bool = False, require: MetaData | None = None
) -> SchemaStatus:
    """The start-up check: bring an empty database to head; accept one at head; upgrade an
    older or unversioned one only with ``auto_upgrade``; refuse anything else with
    :class:`SchemaError`. ``require``: tables the caller needs, checked to exist."""
    with locked(engine) as conn:
        st = status(conn)
        if st.state == "empty" or (auto_upgrade and st.state in ("behind", "unversioned")):
            log.info(
                "bringing the database from %s to schema revision %s",
                st.revision or st.state,
                st.head,
            )
            command.upgrade(alembic_config(conn), "head")
            st = status(conn)
        if st.state != "current":
            raise SchemaError(_message(st, engine))
        if require is not None:
            missing = set(require.tables) - set(inspect(conn).get_table_names())
            if missing:
                raise SchemaError(
                    f"the database lacks tables {', '.join(sorted(missing))}, which no"
                    " migration creates"
                )
    return st


def drop_all(engine: Engine) -> None:
    """Drop every table of the coordinator's database and its recorded revision."""
    with locked(engine) as conn:
        target_metadata().drop_all(conn)
        conn.execute(text(f"DROP TABLE IF EXISTS {VERSION_TABLE}"))


def new_revision(message: str) -> Path:
    """Write the revision that takes the schema at head to what the models now declare
    (Alembic's autogenerate, against a scratch SQLite database brought to head), numbered
    after the head; returns its file, to review and commit. For developers changing a
    model: ``python -c "from lepton.coordinator.store.migrations import new_revision;
    new_revision('tasks: a priority column')"``."""
    import tempfile

    from lepton.coordinator.store.connection import make_engines

    rev_id = f"{revision_number(head()) + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        engines = make_engines(f"sqlite:///{Path(tmp) / 'head.db'}")
        try:
            upgrade(engines.write)
            with engines.write.begin() as conn:
                script = command.revision(
                    alembic_config(conn), message, autogenerate=True, rev_id=rev_id
                )
        finally:
            engines.dispose()
    scripts.cache_clear()
    assert isinstance(script, Script), script
    return Path(script.path)


def upgrade_command(engine: Engine) -> str:
    """The command line that upgrades the database ``engine`` is on (password hidden)."""
    url = engine.url.render_as_string(hide_password=True)
    return f"lepton db upgrade --database {shlex.quote(url)}"


def _message(st: SchemaStatus, engine: Engine) -> str:
    run = upgrade_command(engine)
    if st.state == "ahead":
        return (
            f"the database is at schema revision {st.revision}, which this coordinator does"
            f" not know (it runs {st.head}): the coordinator is older than the database; run"
            " the release that upgraded it, or a newer one"
        )
    if st.state == "unversioned":
        return (
            "the database was made by a release before schema migrations (its tables have no"
            f" recorded revision; this coordinator runs {st.head}): back it up, then run"
            f" `{run}` (or set [database] auto_upgrade = true)"
        )
    return (
        f"the database is at schema revision {st.revision}, this coordinator runs {st.head}:"
        f" back it up, then run `{run}` (or set [database] auto_upgrade = true)"
    )
