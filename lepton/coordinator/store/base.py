"""What every part of the store shares: engines, sessions and dialect helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast

from sqlalchemy import CursorResult, Result, Select, Table, case
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from lepton.coordinator.store.connection import Engines
from lepton.coordinator.store.records import RetryPolicy
from lepton.protocol.messages import Task

S = TypeVar("S", bound=Select[Any])


class StoreBase:
    """Engines and session scopes; the concept-specific parts of the store build on it."""

    def __init__(self, engines: Engines, *, retry: RetryPolicy, history_limit: int) -> None:
        self._engines = engines
        self.retry = retry
        self.history_limit = history_limit
        # Per task kind: adds what only the receiving device may see to a task's message
        # as it is sent (see TaskOps.add_sealer); never stored.
        self._sealers: dict[str, Callable[[Task, str], Task]] = {}

    @property
    def dialect(self) -> str:
        return self._engines.dialect

    @contextmanager
    def _write(self) -> Iterator[Session]:
        """One write transaction: committed on success, rolled back on any exception."""
        with Session(self._engines.write, expire_on_commit=False) as session, session.begin():
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
