from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from lepton.agent.outbox import Outbox


async def test_put_survives_reopen_and_ack_removes(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    async with Outbox(path) as box:
        await asyncio.gather(*(box.put(f"r{i}", "t/result", b"x%d" % i) for i in range(50)))
        assert len(box) == 50
        await box.mark_sent([1, 2, 3], time.time())
    async with Outbox(path) as box:
        assert len(box) == 50
        # After a restart nothing counts as sent: all 50 are due again, in order.
        due = await box.unsent(resend_before=0.0, limit=100)
        assert [e.id for e in due] == [f"r{i}" for i in range(50)]
        assert await box.ack([f"r{i}" for i in range(10)] + ["unknown"]) == 10
        assert len(box) == 40


async def test_group_commit_batches_concurrent_writes(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "agent.db") as box:
        await asyncio.gather(*(box.put(f"r{i}", "t", b"") for i in range(1000)))
        assert box.batched_writes == 1000
        # Concurrent writes share transactions: far fewer commits than writes.
        assert box.commits < 200


async def test_put_is_idempotent_on_id(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "agent.db") as box:
        await box.put("same", "t", b"1")
        await box.put("same", "t", b"2")
        assert len(box) == 1


async def test_sent_entries_are_not_due_until_resend_window(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "agent.db") as box:
        await box.put("a", "t", b"")
        await box.put("b", "t", b"")
        now = time.time()
        await box.mark_sent([1], now)
        assert [e.id for e in await box.unsent(resend_before=now - 30)] == ["b"]
        assert [e.id for e in await box.unsent(resend_before=now + 1)] == ["a", "b"]
        await box.reset_sent()
        assert len(await box.unsent(resend_before=0.0)) == 2


async def test_inbox_accept_finish_and_dedupe(tmp_path: Path) -> None:
    path = tmp_path / "agent.db"
    exp = time.time() + 60
    async with Outbox(path) as box:
        assert await box.accept("t1", 1, exp, b"task1")
        assert not await box.accept("t1", 1, exp, b"task1")  # redelivery
        assert await box.accept("t1", 2, exp, b"task1-retry")  # a new attempt is new work
        assert await box.accept("t2", 1, exp, b"task2")
        await box.finish("r1", "t", b"res", task=("t1", 1, exp))
    async with Outbox(path) as box:
        pending = await box.inbox()
        assert [(t.task_id, t.attempt) for t in pending] == [("t1", 2), ("t2", 1)]
        assert not await box.accept("t1", 1, exp, b"task1")  # finished before the restart
        assert len(box) == 1


async def test_finish_is_atomic(tmp_path: Path) -> None:
    """Result insert and inbox retirement commit together or not at all."""
    path = tmp_path / "agent.db"
    exp = time.time() + 60
    async with Outbox(path) as box:
        await box.accept("t1", 1, exp, b"task")
        await box.finish("r1", "t", b"res", task=("t1", 1, exp))
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT COUNT(*) FROM inbox").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM done").fetchone()[0] == 1
    conn.close()


async def test_prune_done_forgets_expired(tmp_path: Path) -> None:
    async with Outbox(tmp_path / "agent.db") as box:
        now = time.time()
        await box.accept("old", 1, now - 1, b"")
        await box.finish("r", "t", b"", task=("old", 1, now - 1))
        await box.accept("new", 1, now + 100, b"")
        await box.finish("r2", "t", b"", task=("new", 1, now + 100))
        assert await box.prune_done(now) == 1
