"""The agent's durable state: accepted tasks (inbox) and unacknowledged results (outbox).

One SQLite file in the state directory. Every write goes through a single writer thread with
group commit: writes that arrive while a transaction is being committed are committed together
in the next one, so durability costs one fsync per batch, not one per result.

Guarantees:
- a result is committed before it is published, and deleted only when the coordinator
  acknowledges its id; on reconnect and on restart every unacknowledged result is re-sent;
- finishing a task is one transaction: its result enters the outbox and the task leaves the
  inbox together, so a crash never loses a result nor re-runs a finished task;
- a task's start is committed (``starts`` counts them) before its handler runs, so a task
  that was running when the agent died is known at the next start; the runner retires one
  that has killed the agent too often instead of running it again (poison-task quarantine);
- overflow policy: the outbox is bounded by ``max_entries``. The agent refuses *new* tasks
  while ``len(outbox) + tasks in hand`` would reach the bound (``outbox_full``), so a result of
  a task it accepted always has room and nothing it finished is ever dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    id       TEXT NOT NULL UNIQUE,
    topic    TEXT NOT NULL,
    payload  BLOB NOT NULL,
    created  REAL NOT NULL,
    sent_at  REAL
);
CREATE TABLE IF NOT EXISTS inbox (
    task_id    TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    payload    BLOB NOT NULL,
    received   REAL NOT NULL,
    starts     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, attempt)
);
CREATE TABLE IF NOT EXISTS done (
    task_id    TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (task_id, attempt)
);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One unacknowledged result."""

    seq: int
    id: str
    topic: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class InboxTask:
    """An accepted, unfinished task; ``starts``: how often its handler was started (a task
    still in the inbox after a start was running when the agent stopped or died)."""

    task_id: str
    attempt: int
    payload: bytes
    starts: int = 0


class Outbox:
    """Durable inbox/outbox with group commit. Use as ``async with Outbox(path) as box``."""

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = 100_000,
        sync: Literal["full", "normal"] = "full",
        executor: Executor | None = None,
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self._sync = sync
        # One thread owns the connection. A simulator with many agents passes one shared
        # single-thread executor instead of a thread per agent.
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="outbox"
        )
        self._conn: sqlite3.Connection | None = None
        self._batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._count = 0
        self.commits = 0
        self.batched_writes = 0

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Outbox:
        await self._run(self._open)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._sync == 'full' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(inbox)")}
        if "starts" not in columns:  # a state file from before start counting
            conn.execute("ALTER TABLE inbox ADD COLUMN starts INTEGER NOT NULL DEFAULT 0")
        # Nothing is in flight after a restart: everything unacknowledged is re-sent.
        conn.execute("UPDATE outbox SET sent_at = NULL")
        conn.execute("DELETE FROM done WHERE expires_at < ?", (time.time(),))
        self._count = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        self._conn = conn

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        if self._own_executor:
            self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ------------------------------------------------------------ group commit

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``op`` inside the next group-committed transaction; return once it is durable."""
        return await self._submit(op)

    def _submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``op`` for the next group commit; the future is done once it is durable."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._batch.append((op, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="outbox-flush")
        return fut

    async def _flush(self) -> None:
        while self._batch:
            batch, self._batch = self._batch, []
            try:
                ops = [op for op, _ in batch]
                results = await self._run(functools.partial(self._commit, ops))
            except Exception as exc:  # a failed commit fails every write in it
                log.exception("outbox commit failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    def _commit(self, ops: Sequence[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        conn = self._require()
        conn.execute("BEGIN IMMEDIATE")
        try:
            results = [op(conn) for op in ops]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.commits += 1
        self.batched_writes += len(ops)
        return results

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("outbox is closed")
        return self._conn

    # ------------------------------------------------------------ outbox

    def __len__(self) -> int:
        """Unacknowledged results (committed)."""
        return self._count

    async def put(self, msg_id: str, topic: str, payload: bytes) -> None:
        """Durably store one result; returns once committed. Idempotent on ``msg_id``."""
        await self.finish(msg_id, topic, payload, task=None)

    async def finish(
        self, msg_id: str, topic: str, payload: bytes, *, task: tuple[str, int, float] | None
    ) -> None:
        """Store a result and, in the same transaction, move its task from inbox to done."""

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT OR IGNORE INTO outbox (id, topic, payload, created) VALUES (?, ?, ?, ?)",
                (msg_id, topic, payload, time.time()),
            )
            if task is not None:
                task_id, attempt, expires_at = task
                conn.execute(
                    "DELETE FROM inbox WHERE task_id = ? AND attempt = ?", (task_id, attempt)
                )
                conn.execute(
                    "INSERT OR IGNORE INTO done (task_id, attempt, expires_at) VALUES (?, ?, ?)",
                    (task_id, attempt, expires_at),
                )
            return cur.rowcount

        added: int = await self._write(op)
        self._count += added

    async def ack(self, ids: Iterable[str]) -> int:
        """Delete acknowledged results; returns how many were pending."""
        id_list = list(ids)

        def op(conn: sqlite3.Connection) -> int:
            return conn.executemany(
                "DELETE FROM outbox WHERE id = ?", ((i,) for i in id_list)
            ).rowcount

        removed: int = await self._write(op)
        self._count -= removed
        return removed

    async def unsent(self, *, resend_before: float, limit: int = 500) -> list[Entry]:
        """Entries never published on this connection, or published before ``resend_before``."""

        def read() -> list[Entry]:
            rows = (
                self._require()
                .execute(
                    "SELECT seq, id, topic, payload FROM outbox"
                    " WHERE sent_at IS NULL OR sent_at < ? ORDER BY seq LIMIT ?",
                    (resend_before, limit),
                )
                .fetchall()
            )
            return [Entry(*row) for row in rows]

        return await self._run(read)

    async def mark_sent(self, seqs: Sequence[int], when: float) -> None:
        """Record that these entries were accepted by the broker (not yet by the coordinator)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE outbox SET sent_at = ? WHERE seq = ?", ((when, s) for s in seqs)
            )

        await self._write(op)

    async def reset_sent(self) -> None:
        """After a reconnect every unacknowledged entry is due again."""
        await self._write(lambda conn: conn.execute("UPDATE outbox SET sent_at = NULL").rowcount)

    # ------------------------------------------------------------ inbox

    async def accept(self, task_id: str, attempt: int, expires_at: float, payload: bytes) -> bool:
        """Durably take a task; False if this (task, attempt) was already taken or finished."""

        def op(conn: sqlite3.Connection) -> bool:
            seen = conn.execute(
                "SELECT 1 FROM done WHERE task_id = ? AND attempt = ?"
                " UNION ALL SELECT 1 FROM inbox WHERE task_id = ? AND attempt = ?",
                (task_id, attempt, task_id, attempt),
            ).fetchone()
            if seen:
                return False
            conn.execute(
                "INSERT INTO inbox (task_id, attempt, expires_at, payload, received)"
                " VALUES (?, ?, ?, ?, ?)",
                (task_id, attempt, expires_at, payload, time.time()),
            )
            return True

        accepted: bool = await self._write(op)
        return accepted

    async def started(self, task_id: str, attempt: int) -> int:
        """Count a start of this task; returns once committed, with the starts so far.

        Called just before the handler runs: if the handler takes the process down, the
        count survives it (finishing the task deletes the row, and the count with it).
        """

        def op(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "UPDATE inbox SET starts = starts + 1 WHERE task_id = ? AND attempt = ?"
                " RETURNING starts",
                (task_id, attempt),
            ).fetchone()
            return int(row[0]) if row else 0

        starts: int = await self._write(op)
        return starts

    def unstart(self, task_id: str, attempt: int) -> None:
        """Take back one start of a task that was stopped on purpose (a shutdown cancelled
        it), without waiting: the write joins the next commit, which :meth:`close` awaits."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE inbox SET starts = MAX(starts - 1, 0) WHERE task_id = ? AND attempt = ?",
                (task_id, attempt),
            )

        # Nobody awaits it: a failed commit is logged by the flusher, and retrieved here.
        self._submit(op).add_done_callback(lambda f: f.cancelled() or f.exception())

    async def inbox(self) -> list[InboxTask]:
        """Tasks accepted but not finished (to resume after a restart), oldest first."""

        def read() -> list[InboxTask]:
            rows = (
                self._require()
                .execute("SELECT task_id, attempt, payload, starts FROM inbox ORDER BY received")
                .fetchall()
            )
            return [InboxTask(*row) for row in rows]

        return await self._run(read)

    async def prune_done(self, now: float | None = None) -> int:
        """Forget finished tasks whose expiry passed (they can never be run again anyway)."""
        cutoff = time.time() if now is None else now
        removed: int = await self._write(
            lambda conn: conn.execute("DELETE FROM done WHERE expires_at < ?", (cutoff,)).rowcount
        )
        return removed
