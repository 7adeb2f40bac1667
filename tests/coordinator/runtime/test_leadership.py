"""Leadership over a real store: one leader at a time, hand-over on release and on expiry."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.leadership import LEASE_NAME, Leadership
from lepton.coordinator.store import Lease, Store
from tests.coordinator.conftest import eventually


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(f"sqlite:///{tmp_path / 'l.db'}", sqlite_synchronous="normal")


async def test_one_leader_then_hand_over(store: Store) -> None:
    a = Leadership(store.leases, "a", 0.6, Metrics())
    b = Leadership(store.leases, "b", 0.6, Metrics())
    ta = asyncio.create_task(a.run())
    await eventually(lambda: a.is_leader)
    tb = asyncio.create_task(b.run())
    await asyncio.sleep(0.5)
    assert not b.is_leader  # a keeps renewing
    # A clean release hands over at once; a crash hands over once the lease runs out.
    ta.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ta
    await a.release()
    await eventually(lambda: b.is_leader, timeout=1.0)
    holder = store.leases.lease_holder(LEASE_NAME)
    assert holder is not None
    assert holder.holder == "b"
    tb.cancel()  # b "crashes": no release
    with contextlib.suppress(asyncio.CancelledError):
        await tb
    c = Leadership(store.leases, "c", 0.6, Metrics())
    tc = asyncio.create_task(c.run())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await eventually(lambda: c.is_leader, timeout=2.0, interval=0.01)
    assert loop.time() - started <= 0.6 + 0.2
    tc.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tc


async def test_lead_runs_bodies_per_term_and_stops_them_on_loss(store: Store) -> None:
    a = Leadership(store.leases, "a", 0.6, Metrics())
    terms: list[int] = []
    stopped = asyncio.Event()

    async def body(lease: Lease) -> None:
        terms.append(lease.epoch)
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    runner = asyncio.create_task(a.run())
    leading = asyncio.create_task(a.lead(body, name="test"))
    await eventually(lambda: terms == [1])
    # Another replica takes the lease over (as if ours had expired).
    lease = a.lease
    assert lease is not None
    store.leases.release_lease(lease)
    assert store.leases.acquire_lease(LEASE_NAME, "other", 10**10, 60) is not None
    await asyncio.wait_for(stopped.wait(), 2.0)
    assert not a.is_leader
    for t in (runner, leading):
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t
