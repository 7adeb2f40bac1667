"""Task intake and execution: validation, durable acceptance, a bounded queue, worker slots.

A task is accepted only after it is committed to the inbox, runs in one of ``slots`` workers,
and finishes by committing its result to the outbox in the same transaction that retires it
from the inbox. After a crash, unfinished tasks are resumed from the inbox.

Each start is committed before the handler runs. A task that was running ``crash_limit``
times when the agent died (a handler that aborts the process, exhausts its memory, hits a
native crash) is not run again at the next start: it is retired with a ``failed`` result
whose error begins with ``crashed_agent``, so one poison task cannot crash-loop a device
until it expires.

A cancel (:meth:`Runner.cancel`) retires a queued task at once: its ``cancelled`` result
enters the outbox in the transaction that takes it out of the inbox, so the cancel holds
across a restart. A running task's cancel token is set; the handler stops at its next check
and the task ends ``cancelled``. A cancel for a task this agent does not hold is remembered
for a while, so the task is refused if it arrives after its cancel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import msgspec

from lepton.agent.cancellation import CancelToken, EarlyCancels
from lepton.agent.handlers import HandlerRegistry, TaskContext
from lepton.agent.metrics import Counters
from lepton.agent.outbox import Outbox
from lepton.protocol.codec import decode, encode
from lepton.protocol.errors import DecodeError
from lepton.protocol.messages import FailureReason, Result, Slots, Task, TaskStatus

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 4000
#: The error of a task retired because it was running each time the agent died.
CRASHED_AGENT: Final[FailureReason] = "crashed_agent"


class Runner:
    """Runs tasks in ``slots`` concurrent workers from a bounded queue."""

    def __init__(
        self,
        *,
        slots: int,
        queue_limit: int,
        registry: HandlerRegistry,
        outbox: Outbox,
        context: TaskContext,
        result_topic: str,
        counters: Counters,
        crash_limit: int = 2,
        on_result: Callable[[], None] = lambda: None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.slots = slots
        self.queue_limit = queue_limit
        self._registry = registry
        self._outbox = outbox
        self._ctx = context
        self._topic = result_topic
        self._counters = counters
        self.crash_limit = crash_limit
        self._on_result = on_result
        self._on_change = on_change
        self._queue: asyncio.Queue[Task] = asyncio.Queue()
        # Tasks in the queue by id, and the ones a cancel retired while still in it (the
        # queue cannot drop an item; a worker skips them).
        self._queued: dict[str, Task] = {}
        self._retired: set[tuple[str, int]] = set()
        self._running: dict[str, CancelToken] = {}
        self._early_cancels = EarlyCancels()
        self._busy = 0
        self._accepting = True
        self._draining = False
        self._no_busy = asyncio.Event()
        self._no_busy.set()

    # ------------------------------------------------------------ state

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def queued(self) -> int:
        return self._queue.qsize() - len(self._retired)

    def in_hand(self) -> int:
        return self._busy + self.queued

    def slots_report(self) -> Slots:
        return Slots(total=self.slots, busy=self._busy, queued=self.queued)

    def stop_accepting(self) -> None:
        self._accepting = False

    # ------------------------------------------------------------ intake

    async def submit(self, payload: bytes, *, now: float | None = None) -> tuple[Task, str | None]:
        """Validate and durably accept one task; return it and a refusal reason (None: accepted).

        Raises :class:`DecodeError` when the payload is not a valid task at all.
        """
        task = decode(payload, Task)
        now = time.time() if now is None else now
        reason = self._refusal(task, now)
        if reason == "unknown_kind":
            # Not a crash and not silence: the coordinator gets a definitive error result.
            await self._finish(
                task, "rejected", error=f"unknown task kind {task.kind!r}", durable=False
            )
        if reason is not None:
            self._counters.inc(f"tasks.refused.{reason}")
            return task, reason
        if not await self._outbox.accept(task.task_id, task.attempt, task.expires_at, payload):
            self._counters.inc("tasks.refused.duplicate")
            return task, "duplicate"
        self._enqueue(task)
        return task, None

    def _refusal(self, task: Task, now: float) -> str | None:  # noqa: PLR0911
        if not self._accepting:
            return "shutting_down"
        if task.task_id in self._early_cancels:
            return "cancelled"
        if task.expires_at <= now:
            return "expired"
        if self._registry.get(task.kind) is None:
            return "unknown_kind"
        if self.queued >= self.queue_limit:
            return "queue_full"
        if len(self._outbox) + self.in_hand() >= self._outbox.max_entries:
            return "outbox_full"
        return None

    def _enqueue(self, task: Task) -> None:
        self._queued[task.task_id] = task
        self._queue.put_nowait(task)
        self._counters.inc("tasks.accepted")
        self._on_change()

    async def resume(self) -> int:
        """Re-queue tasks accepted before a restart and not finished; retire, instead, those
        that were running ``crash_limit`` times when the agent died. Returns the re-queued."""
        resumed = 0
        for entry in await self._outbox.inbox():
            try:
                task = decode(entry.payload, Task)
            except DecodeError:  # written by us, so only a corrupted file gets here
                log.exception("dropping unreadable inbox entry %s", entry.task_id)
                continue
            if entry.starts >= self.crash_limit:
                log.error(
                    "task %s (%s) was running each of the %d times the agent died;"
                    " failing it as %s instead of running it again",
                    task.task_id,
                    task.kind,
                    entry.starts,
                    CRASHED_AGENT,
                )
                self._counters.inc(f"tasks.{CRASHED_AGENT}")
                await self._finish(
                    task,
                    "failed",
                    error=f"{CRASHED_AGENT}: the agent died {entry.starts} times while"
                    f" running this {task.kind} task",
                    reason=CRASHED_AGENT,
                )
                continue
            if entry.starts:
                self._counters.inc("tasks.resumed_after_crash")
            self._enqueue(task)
            resumed += 1
        if resumed:
            log.info("resumed %d unfinished tasks from the inbox", resumed)
        return resumed

    # ------------------------------------------------------------ execution

    async def worker(self) -> None:
        """One execution slot; run as a named task in the agent's TaskGroup."""
        while True:
            task = await self._queue.get()
            key = (task.task_id, task.attempt)
            if key in self._retired:  # cancelled while queued: its result is written
                self._retired.discard(key)
                self._queue.task_done()
                continue
            if self._draining:  # stays in the inbox and resumes on the next start
                self._queue.put_nowait(task)
                self._queue.task_done()
                return
            if self._queued.get(task.task_id) is task:
                del self._queued[task.task_id]
            self._busy += 1
            self._no_busy.clear()
            self._on_change()
            try:
                await self._execute(task)
            finally:
                self._busy -= 1
                self._queue.task_done()
                if self._busy == 0:
                    self._no_busy.set()
                self._on_change()

    async def _execute(self, task: Task) -> None:
        started = time.time()
        if task.expires_at <= started:
            await self._finish(
                task, "expired", error="expired before it could start", started=started
            )
            return
        handler = self._registry.get(task.kind)
        if handler is None:  # only reachable for a task resumed after a handler was removed
            await self._finish(
                task, "rejected", error=f"unknown task kind {task.kind!r}", started=started
            )
            return
        timeout = task.params.get("timeout_s")
        timeout = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None
        token = CancelToken()
        self._running[task.task_id] = token
        try:
            await self._run_handler(task, handler, token, timeout, started)
        finally:
            self._running.pop(task.task_id, None)

    async def _run_handler(
        self, task: Task, handler: Any, token: CancelToken, timeout: float | None, started: float
    ) -> None:
        # Committed before the handler runs: a handler that takes the process down leaves
        # the count behind for resume() to see.
        await self._outbox.started(task.task_id, task.attempt)
        ctx = dataclasses.replace(self._ctx, cancel=token)
        status: TaskStatus = "succeeded"
        output: dict[str, Any] | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(timeout):
                output = await handler(task, ctx)
        except TimeoutError:
            status, error = "failed", f"timed out after {timeout} s"
        except asyncio.CancelledError:
            # Stopped by a shutdown, not a crash: this start must not count towards quarantine.
            self._outbox.unstart(task.task_id, task.attempt)
            raise
        except Exception as exc:  # any handler error is a failed result, never a dead worker
            log.info("task %s (%s) failed: %s", task.task_id, task.kind, exc)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
        if token.is_set():  # asked to stop: whatever the handler made of it, not a result
            log.info("task %s (%s) cancelled while running", task.task_id, task.kind)
            status, output, error = "cancelled", None, f"cancelled: {token.reason}"
        await self._finish(task, status, output=output, error=error, started=started)

    async def cancel(self, task_ids: Sequence[str], reason: str) -> dict[str, int]:
        """Cancel these tasks (idempotent): a queued one ends at once, a running one at its
        handler's next check, each with a ``cancelled`` result; an id this agent does not
        hold (unknown, or finished) is remembered and otherwise ignored. Returns how many
        were ``queued``, ``running`` and ``ignored``."""
        counts = dict.fromkeys(("queued", "running", "ignored"), 0)
        for task_id in dict.fromkeys(task_ids):
            token = self._running.get(task_id)
            if token is not None:
                token.set(reason)
                counts["running"] += 1
                continue
            task = self._queued.pop(task_id, None)
            if task is None:
                self._early_cancels.add(task_id)
                counts["ignored"] += 1
                continue
            self._retired.add((task.task_id, task.attempt))
            counts["queued"] += 1
            await self._finish(task, "cancelled", error=f"cancelled: {reason}")
            self._on_change()
        for what, n in counts.items():
            if n:
                self._counters.inc(f"tasks.cancel.{what}", n)
        if counts["ignored"]:
            log.info(
                "cancel (%s) ignored for %d tasks this agent does not hold",
                reason,
                counts["ignored"],
            )
        return counts

    async def _finish(
        self,
        task: Task,
        status: TaskStatus,
        *,
        output: dict[str, Any] | None = None,
        error: str | None = None,
        started: float | None = None,
        durable: bool = True,
        reason: FailureReason | None = None,
    ) -> None:
        result = self._build(task, status, output, error, started, reason=reason)
        try:
            payload = encode(result)
        except (ValueError, TypeError, msgspec.EncodeError) as exc:
            result = self._build(task, "failed", None, f"output not encodable: {exc}", started)
            payload = encode(result)
        retire = (task.task_id, task.attempt, task.expires_at) if durable else None
        await self._outbox.finish(result.id, self._topic, payload, task=retire)
        self._counters.inc(f"tasks.{result.status}")
        self._on_result()

    def _build(
        self,
        task: Task,
        status: TaskStatus,
        output: dict[str, Any] | None,
        error: str | None,
        started: float | None,
        *,
        reason: FailureReason | None = None,
    ) -> Result:
        return Result(
            task_id=task.task_id,
            attempt=task.attempt,
            status=status,
            output=output or {},
            error=None if error is None else error[:MAX_ERROR_CHARS],
            reason=reason,
            started_at=started,
            finished_at=time.time(),
        )

    async def drain(self, timeout: float) -> bool:
        """Stop starting tasks and wait for running ones (or ``timeout``); True if drained.

        Queued tasks are not started; they stay in the durable inbox and resume on the next
        start (or, if the agent does not come back, the coordinator reassigns them).
        """
        self._accepting = False
        self._draining = True
        try:
            async with asyncio.timeout(timeout):
                await self._no_busy.wait()
        except TimeoutError:
            return False
        return True
