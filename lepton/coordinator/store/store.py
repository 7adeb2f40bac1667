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

from sqlalchemy import MetaData, inspect, text

from lepton.coordinator.store import migrations
from lepton.coordinator.store.base import StoreBase
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.connection import Engines, make_engines
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.estimates import EstimateRepo
from lepton.coordinator.store.lease import LeaseRepo
from lepton.coordinator.store.records import RetryPolicy
from lepton.coordinator.store.results import ResultRepo
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
        auto_upgrade: bool = False,
        echo: bool = False,
        sqlite_synchronous: str = "full",
    ) -> Store:
        """Connect to ``url`` and (by default) check its schema (:meth:`create_schema`)."""
        store = cls(
            make_engines(url, echo=echo, sqlite_synchronous=sqlite_synchronous),
            retry=retry,
            history_limit=capacity_history,
        )
        if create:
            store.create_schema(auto_upgrade=auto_upgrade)
        return store

    def create_schema(self, *metadata: MetaData, auto_upgrade: bool = False) -> None:
        """Bring an empty database to the schema this release runs, through the migrations;
        refuse one at another revision (:class:`~lepton.coordinator.store.migrations.SchemaError`)
        unless ``auto_upgrade`` and it is older. ``metadata``: tables the caller needs,
        checked to exist. Idempotent, and safe when several replicas start at once.

        The coordinator calls this once at start-up with every feature's tables
        (``Coordinator._create_tables``): the one place its schema is made."""
        for meta in metadata or (None,):
            migrations.prepare(self._engines.write, auto_upgrade=auto_upgrade, require=meta)

    def drop_schema(self) -> None:
        """Drop every table and the recorded schema revision (tests)."""
        migrations.drop_all(self._engines.write)

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
