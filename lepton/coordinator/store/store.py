"""The coordinator's store: one class over SQLite or PostgreSQL.

Every public method is one transaction and takes and returns plain values
(:mod:`lepton.coordinator.store.records`). Methods are synchronous; the service calls them from
worker threads so the event loop never waits on the database.
"""

from __future__ import annotations

import logging

from sqlalchemy import Engine, MetaData, inspect, text

from lepton.coordinator.store import migrations
from lepton.coordinator.store.cancels import CancelOps
from lepton.coordinator.store.connection import make_engines
from lepton.coordinator.store.devices import DeviceOps
from lepton.coordinator.store.estimates import EstimateOps
from lepton.coordinator.store.lease import LeaseOps
from lepton.coordinator.store.records import RetryPolicy
from lepton.coordinator.store.results import ResultOps
from lepton.coordinator.store.tasks import TaskOps

log = logging.getLogger(__name__)


class Store(DeviceOps, TaskOps, CancelOps, ResultOps, EstimateOps, LeaseOps):
    """Devices, capacity history, tasks and their cancels, attempts, results, throughput
    estimates, leases."""

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
            retry=retry or RetryPolicy(),
            history_limit=capacity_history,
        )
        if create:
            store.create_schema(auto_upgrade=auto_upgrade)
        return store

    def create_schema(
        self, metadata: MetaData | None = None, *, auto_upgrade: bool = False
    ) -> None:
        """Bring an empty database to the schema this release runs, through the migrations;
        refuse one at another revision (:class:`~lepton.coordinator.store.migrations.SchemaError`)
        unless ``auto_upgrade`` and it is older. ``metadata``: tables the caller needs,
        checked to exist. Idempotent, and safe when several replicas start at once."""
        migrations.prepare(self._engines.write, auto_upgrade=auto_upgrade, require=metadata)

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

    @property
    def engine(self) -> Engine:
        """The engine writes go through, for components that keep their own tables next to
        the store's (the model registry)."""
        return self._engines.write

    def close(self) -> None:
        self._engines.dispose()
