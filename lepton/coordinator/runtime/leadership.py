"""Leadership: which replica schedules, decided by a database lease.

The lease is renewed every ``lease_s / 3``. A follower sleeps until the lease it saw expires
and then tries to take it, so a dead leader is replaced within about one lease period. A
leader that cannot renew (database unreachable) steps down before its lease runs out, and
every leader-only write checks the lease's epoch in its own transaction (fencing), so two
replicas never act as leader at once. A lone coordinator is simply always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

from lepton.coordinator.errors import LeaseLostError
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import Lease
from lepton.coordinator.store.lease import LeaseRepo
from lepton.protocol.aio import cancel_and_wait

log = logging.getLogger(__name__)

LEASE_NAME: Final = "scheduler"
STEP_DOWN_MARGIN: Final = 0.2  # fraction of the lease kept in hand before stepping down


class Leadership:
    """Holds the scheduling lease while it can; leader-only loops run through :meth:`lead`."""

    def __init__(self, leases: LeaseRepo, holder: str, lease_s: float, metrics: Metrics) -> None:
        self.leases = leases
        self.holder = holder
        self.lease_s = lease_s
        self.metrics = metrics
        self.lease: Lease | None = None
        self.terms = 0
        self._leading = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost.set()

    @property
    def is_leader(self) -> bool:
        return self.lease is not None

    async def run(self) -> None:
        """Acquire and renew the lease forever."""
        while True:
            now = time.time()
            try:
                if self.lease is None:
                    delay = await self._try_acquire(now)
                else:
                    delay = await self._renew(now)
            except Exception:
                log.exception("lease %s: database error", LEASE_NAME)
                delay = self.lease_s / 6
                if self.lease is not None and time.time() > self.lease.expires_at - (
                    self.lease_s * STEP_DOWN_MARGIN
                ):
                    self._step_down("cannot renew before it expires")
            await asyncio.sleep(delay)

    async def _try_acquire(self, now: float) -> float:
        lease = await asyncio.to_thread(
            self.leases.acquire_lease, LEASE_NAME, self.holder, now, self.lease_s
        )
        if lease is not None:
            self.lease = lease
            self.terms += 1
            self._lost.clear()
            self._leading.set()
            self.metrics.leader.set(1)
            log.info("leading scheduling (lease epoch %d)", lease.epoch)
            return self.lease_s / 3
        seen = await asyncio.to_thread(self.leases.lease_holder, LEASE_NAME)
        wait = self.lease_s / 3
        if seen is not None:
            # Try again right after the current holder's lease runs out.
            wait = min(wait, max(0.05, seen.expires_at - time.time() + 0.05))
        return wait

    async def _renew(self, now: float) -> float:
        assert self.lease is not None
        renewed = await asyncio.to_thread(self.leases.renew_lease, self.lease, now, self.lease_s)
        if renewed is None:
            self._step_down("taken over by another replica")
            return 0.0
        self.lease = renewed
        return self.lease_s / 3

    def _step_down(self, why: str, *, level: int = logging.WARNING) -> None:
        if self.lease is None:
            return
        log.log(level, "no longer leading scheduling: %s", why)
        self.lease = None
        self._leading.clear()
        self._lost.set()
        self.metrics.leader.set(0)

    async def release(self) -> None:
        """Give the lease up (clean shutdown) so another replica takes over at once."""
        lease = self.lease
        self._step_down("shutting down", level=logging.INFO)
        if lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.leases.release_lease, lease)

    async def lead(self, body: Callable[[Lease], Coroutine[Any, Any, None]], *, name: str) -> None:
        """Run ``body(lease)`` during every term of leadership; cancel it when a term ends.

        A :class:`LeaseLostError` raised by a fenced write ends the term early.
        """
        while True:
            await self._leading.wait()
            lease = self.lease
            if lease is None:
                continue
            task = asyncio.create_task(body(lease), name=f"{name}-term")
            lost = asyncio.create_task(self._lost.wait())
            try:
                await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                await cancel_and_wait([task, lost])
                raise
            lost.cancel()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # we are being cancelled ourselves, not just the term
            except LeaseLostError:
                self._step_down("a fenced write found the lease taken")
            except Exception:
                log.exception("%s failed; restarting it", name)
                await asyncio.sleep(1.0)
