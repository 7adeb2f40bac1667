"""What every repository of the store shares: engines, sessions and dialect helpers.

:class:`StoreBase` is the connection and transaction helper under every repository
(``store.devices``, ``store.tasks``, ``store.cancels``, ``store.results``,
``store.estimates``, ``store.leases``) and under the feature stores that keep their own
tables on the same database (:class:`lepton.coordinator.fl.store.FLStore`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Engine, Result, Select, Table, case, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from lepton.coordinator.errors import LeaseLostError
from lepton.coordinator.store.connection import Engines
from lepton.coordinator.store.records import Lease
from lepton.coordinator.store.schema import LeaseRow

S = TypeVar("S", bound=Select[Any])


def check_fence(session: Session, lease: Lease, now: float, *, lock: bool) -> None:
    """Raise :class:`LeaseLostError` unless ``lease`` is still held (in the caller's transaction).

    On PostgreSQL the lease row is share-locked until the transaction ends, so nobody can take
    the lease over while a leader-only write is being committed.
    """
    stmt = select(LeaseRow).where(LeaseRow.name == lease.name)
    if lock:
        stmt = stmt.with_for_update(read=True)
    row = session.scalar(stmt)
    if (
        row is None
        or row.holder != lease.holder
        or row.epoch != lease.epoch
        or row.expires_at <= now
    ):
        raise LeaseLostError(lease.name, lease.holder)


class StoreBase:
    """Engines and session scopes; every repository builds on it (see module doc)."""

    def __init__(self, engines: Engines | Engine) -> None:
        if isinstance(engines, Engine):  # one engine for reads and writes
            engines = Engines(write=engines, read=engines)
        self._engines = engines

    @property
    def dialect(self) -> str:
        return self._engines.dialect

    @property
    def engine(self) -> Engine:
        """The engine writes go through."""
        return self._engines.write

    @contextmanager
    def _write(self, lease: Lease | None = None) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any exception. With
        a ``lease``, the transaction first checks that it is still held (fencing)."""
        with Session(self._engines.write, expire_on_commit=False) as session, session.begin():
            if lease is not None:
                check_fence(session, lease, time.time(), lock=self.dialect == "postgresql")
            yield session

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with Session(self._engines.read, expire_on_commit=False) as session, session.begin():
            yield session

    def _insert(self, table: Table) -> Any:  # postgresql.Insert | sqlite.Insert
        """A dialect INSERT that supports ``on_conflict_do_*``."""
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _locked(self, stmt: S) -> S:
        """``SELECT ... FOR UPDATE`` on PostgreSQL, for reads that precede a write; SQLite's
        ``BEGIN IMMEDIATE`` already serialises writers."""
        return stmt.with_for_update() if self.dialect == "postgresql" else stmt


def greatest(a: ColumnElement[Any], b: ColumnElement[Any] | Any) -> ColumnElement[Any]:
    """max(a, b) for both backends (SQLite has no GREATEST, PostgreSQL no scalar max)."""
    return case((a >= b, a), else_=b)


def rowcount(result: Result[Any]) -> int:
    """Rows matched by an UPDATE or DELETE (``Session.execute`` types DML results loosely)."""
    return cast("CursorResult[Any]", result).rowcount
