"""Database engines: a SQLite file by default, PostgreSQL by URL.

SQLite runs in WAL mode (readers never block the writer) with a busy timeout, and every write
transaction starts with ``BEGIN IMMEDIATE``: a transaction that reads and then writes would
otherwise fail with ``SQLITE_BUSY`` when another writer committed in between, without waiting
for the busy timeout. Reads use a second engine with plain deferred transactions, so API
reads never queue behind the writer. PostgreSQL uses one engine for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import ConnectionPoolEntry

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _json_dumps(value: Any) -> str:
    # msgspec is several times faster than the json module on capacity reports, the bulk of
    # what the registry writes.
    return msgspec.json.encode(value).decode()


def _json_loads(text: str | bytes) -> Any:
    return msgspec.json.decode(text)


@dataclass(frozen=True, slots=True)
class Engines:
    """The engine writes go through and the one reads go through (the same on PostgreSQL)."""

    write: Engine
    read: Engine

    @property
    def dialect(self) -> str:
        return self.write.dialect.name

    def dispose(self) -> None:
        self.write.dispose()
        if self.read is not self.write:
            self.read.dispose()


def _sqlite_engine(url: str, *, immediate: bool, echo: bool, synchronous: str) -> Engine:
    engine = create_engine(
        url,
        echo=echo,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        json_serializer=_json_dumps,
        json_deserializer=_json_loads,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide when transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # FULL (the default): a committed result survives power loss, and its ack lets the
        # agent drop its copy. NORMAL may lose the last commits on power loss (not on a crash).
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def make_engines(url: str, *, echo: bool = False, sqlite_synchronous: str = "full") -> Engines:
    """Engines for ``url``: ``sqlite:///path`` or ``postgresql+psycopg://...``.

    A SQLite file's directory is created if missing. Other backends are not supported.
    """
    if sqlite_synchronous.lower() not in ("full", "normal"):
        raise ValueError("sqlite_synchronous must be 'full' or 'normal'")
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ValueError("SQLite needs a file path (sqlite:///path/to/coordinator.db)")
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return Engines(
            write=_sqlite_engine(url, immediate=True, echo=echo, synchronous=sqlite_synchronous),
            read=_sqlite_engine(url, immediate=False, echo=echo, synchronous=sqlite_synchronous),
        )
    if backend == "postgresql":
        if parsed.get_driver_name() not in ("psycopg", "psycopg2"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        engine = create_engine(
            parsed,
            echo=echo,
            pool_pre_ping=True,
            pool_size=8,
            max_overflow=8,
            json_serializer=_json_dumps,
            json_deserializer=_json_loads,
        )
        return Engines(write=engine, read=engine)
    raise ValueError(f"unsupported database backend {backend!r}; use sqlite or postgresql")
