"""Cooperative cancellation of a running task, and the memory of cancels that came early.

A handler gets its task's :class:`CancelToken` as ``TaskContext.cancel``. The runner sets it
when a :class:`~lepton.protocol.messages.TaskCancel` names the task; the handler checks it where it
can stop cleanly (between training batches, between inference batches, while it sleeps) and
returns or raises. Whatever the handler then does, the task's result is ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Final, TypeVar

T = TypeVar("T")

#: Task ids remembered as cancelled before their task arrived (see :class:`EarlyCancels`).
EARLY_CANCELS: Final = 4096


class CancelToken:
    """Set once, when the task is to stop. Usable from the event loop (:meth:`sleep`,
    :meth:`wait`) and from worker threads (:attr:`event`, :meth:`is_set`)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._waiter = asyncio.Event()
        self.reason = ""

    def set(self, reason: str = "") -> None:
        """Ask the task to stop (from the event loop's thread); the first reason is kept."""
        if not self.event.is_set():
            self.reason = reason
        self.event.set()
        self._waiter.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self) -> None:
        """Return once the task is asked to stop."""
        await self._waiter.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` or until the task is asked to stop; True if it was."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._waiter.wait()
        return self.is_set()

    async def interrupt(self, aw: Awaitable[T]) -> T | None:
        """Await ``aw`` unless the task is asked to stop first: then ``aw`` is cancelled and
        None returned (a wait that only paces the work, say)."""
        job = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._waiter.wait())
        try:
            await asyncio.wait({job, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not job.done():
                job.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job
        return None if job.cancelled() else job.result()


class EarlyCancels:
    """Ids of tasks cancelled while this agent did not hold them, newest ``limit`` kept.

    A cancel and its task travel on different topics, so the cancel may come first (or the
    task may still be on its way after a reconnect): a task whose id is remembered here is
    refused as ``cancelled`` instead of run.
    """

    def __init__(self, limit: int = EARLY_CANCELS) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, task_id: str) -> None:
        self._ids[task_id] = None
        self._ids.move_to_end(task_id)
        while len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)
