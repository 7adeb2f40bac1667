"""The coordinator's store: repositories over SQLite or PostgreSQL.

:class:`Store` opens the database and holds one repository per concept, all over the same
engines (:class:`~lepton.coordinator.store.base.StoreBase`): ``store.devices``,
``store.tasks``, ``store.cancels``, ``store.results``, ``store.estimates`` and
``store.leases``. Components are given the repositories they use. Every public repository
method is one transaction and takes and returns plain values
(:mod:`lepton.coordinator.store.records`). Methods are synchronous; the service calls them
from worker threads so the event loop never waits on the database.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, MetaData, inspect, text

from lepton.coordinator.store.base import StoreBase
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.connection import Engines, make_engines
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.estimates import EstimateRepo
from lepton.coordinator.store.lease import LeaseRepo
from lepton.coordinator.store.records import RetryPolicy
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.schema import Base
from lepton.coordinator.store.tasks import TaskRepo

log = logging.getLogger(__name__)


class Store(StoreBase):
    """Devices and their capacity history, tasks and their attempts, cancels, results,
    throughput estimates, leases: one repository each (see module doc)."""

    def __init__(
        self, engines: Engines, *, retry: RetryPolicy | None = None, history_limit: int = 100
    ) -> None:
        super().__init__(engines)
        self.retry = retry = retry or RetryPolicy()
        self.devices = DeviceRepo(engines, retry=retry, history_limit=history_limit)
        self.tasks = TaskRepo(engines, retry=retry)
        self.cancels = CancelRepo(engines)
        self.results = ResultRepo(engines, retry=retry)
        self.estimates = EstimateRepo(engines)
        self.leases = LeaseRepo(engines)

    @classmethod
    def open(
        cls,
        url: str,
        *,
        retry: RetryPolicy | None = None,
        capacity_history: int = 100,
        create: bool = True,
        echo: bool = False,
        sqlite_synchronous: str = "full",
    ) -> Store:
        """Connect to ``url`` and (by default) create missing tables."""
        store = cls(
            make_engines(url, echo=echo, sqlite_synchronous=sqlite_synchronous),
            retry=retry,
            history_limit=capacity_history,
        )
        if create:
            store.create_schema()
        return store

    def create_schema(self, *metadata: MetaData) -> None:
        """Create missing tables of each ``metadata`` (default: the store's own) and add
        missing nullable columns to existing ones, in one transaction; idempotent and safe
        when several replicas start at once.

        The coordinator calls this once at start-up with every feature's tables
        (``Coordinator._create_tables``): the one place the schema is made."""
        metas = metadata or (Base.metadata,)
        with self._engines.write.begin() as conn:
            if self.dialect == "postgresql":
                # Serialise concurrent start-ups: CREATE TABLE IF NOT EXISTS races in PostgreSQL.
                conn.execute(text("SELECT pg_advisory_xact_lock(74201)"))
            for meta in metas:
                meta.create_all(conn)
                _add_missing_columns(conn, meta)

    def drop_schema(self) -> None:
        """Drop every table (tests, and ``lepton coordinator reset``)."""
        Base.metadata.drop_all(self._engines.write)

    def table_names(self) -> list[str]:
        return sorted(inspect(self._engines.read).get_table_names())

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self._engines.read.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    def close(self) -> None:
        self._engines.dispose()


def _add_missing_columns(conn: Connection, meta: MetaData) -> None:
    """Add the nullable columns a newer release declares to tables an older one created.

    Only additive, nullable columns: anything else (a new constraint, a changed type) needs
    a real migration. This keeps a database from the previous release readable after an
    upgrade until the schema is managed by migrations.
    """
    existing = inspect(conn)
    for table in meta.sorted_tables:
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable or column.primary_key:
                raise RuntimeError(
                    f"table {table.name} lacks column {column.name}, which is not nullable:"
                    " the database needs a migration"
                )
            kind = column.type.compile(dialect=conn.dialect)
            log.info("adding column %s.%s (%s)", table.name, column.name, kind)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
