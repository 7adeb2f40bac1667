"""What a job's runner holds while it runs, and how a round's progress is read.

:class:`JobState` is the base the runner's parts share (:mod:`.opening`, :mod:`.closing`,
:mod:`.runner`): the job, its strategy, the current global weights, the lease, and the
reading of a round's progress from the database (which updates count, who is done).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import numpy as np

from lepton.common.errors import LeptonError
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.fl import modelio
from lepton.coordinator.fl.jobs.planning import train_metrics
from lepton.coordinator.fl.jobs.spec import FLJob
from lepton.coordinator.fl.kernels.strategies import Strategy
from lepton.coordinator.fl.records import JobRecord, RoundRecord, UpdateRecord
from lepton.coordinator.store import Lease
from lepton.coordinator.tasks.states import DEVICE_OFFLINE
from lepton.protocol.tasks import TrainOutput, output_as
from lepton.protocol.weights import decode_weights

if TYPE_CHECKING:
    from lepton.coordinator.fl.jobs.engine import FLEngine

log = logging.getLogger(__name__)

#: Largest weights or update blob the engine decodes.
MAX_DECODE_BYTES: Final = 1 << 32
#: The error of a job failed because its code ended the coordinator while it ran.
CRASHED_LOADER: Final = "crashed_loader"
T = TypeVar("T")


class JobFailedError(LeptonError):
    """The job cannot go on (its model does not load, a round never got enough updates)."""


@dataclass
class Progress:
    """A round's progress: updates that count, uploads waiting for their result, and
    whether every selected device is done."""

    complete: int
    waiting: int
    finished: bool
    #: Devices forced in by the staleness floor and not done yet (counted only when the
    #: job's ``fairness.wait_for_forced`` is set).
    forced_pending: int = 0


class JobState:
    """One job's running state (see module doc)."""

    def __init__(self, engine: FLEngine, record: JobRecord, lease: Lease) -> None:
        self.engine = engine
        self.fl = engine.fl
        self.store = engine.store
        self.registry = engine.registry
        self.lease = lease
        self.job_id = record.id
        self.record = record
        self.job = FLJob.from_mapping(record.spec)
        self.strategy: Strategy = self.job.build_strategy()
        self.global_weights: dict[str, np.ndarray[Any, Any]] | None = None
        self.global_size = 0
        self.eval_set: modelio.EvalSet | None = None
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def _reload(self) -> JobRecord:
        self.record = await asyncio.to_thread(self.fl.get_job, self.job_id)
        return self.record

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _run_code(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (which calls the job's own code: its model factory, its evaluation
        set) in a worker thread, durably counted.

        The count is written before the call and cleared after it, so a call that ended the
        process (an abort no handler catches) is still counted after a restart; once
        ``fl.max_load_attempts`` calls died that way the job fails as ``crashed_loader``
        instead of running its code again. What the code raises fails the job with the
        reason (:class:`JobFailedError`), never retried.
        """
        limit = self.engine.policy.max_load_attempts
        died = await asyncio.to_thread(
            self.fl.begin_load, self.job_id, what, now=time.time(), lease=self.lease
        )
        if died >= limit:
            self.engine.metrics.job_failures.labels(CRASHED_LOADER).inc()
            raise JobFailedError(
                f"{CRASHED_LOADER}: the coordinator died {died} times while running the "
                f"job's code ({what}); not run again"
            )
        try:
            result = await asyncio.to_thread(fn, *args)
        except asyncio.CancelledError:
            self.fl.end_load(self.job_id)  # a shutdown, not a crash: no awaiting once cancelled
            raise
        except modelio.JobCodeError as exc:
            await asyncio.to_thread(self.fl.end_load, self.job_id)
            self.engine.metrics.job_failures.labels("model_error").inc()
            raise JobFailedError(str(exc)) from exc
        except BaseException:
            await asyncio.to_thread(self.fl.end_load, self.job_id)
            raise
        await asyncio.to_thread(self.fl.end_load, self.job_id)
        return result

    async def _cancel_tasks(self, rounds: Sequence[RoundRecord], reason: str) -> int:
        """Cancel the train tasks of these rounds that have not ended (pending ones at once,
        assigned or running ones through their devices); returns how many this changed."""
        ids = sorted({tid for r in rounds for tid in r.tasks.values()})
        if not ids:
            return 0
        outcomes = await asyncio.to_thread(self.store.cancel_tasks, ids, reason, time.time())
        changed = sum(o.changed for o in outcomes)
        if changed:
            self.engine.metrics.tasks_cancelled.labels(reason).inc(changed)
            self.engine.on_submit()  # the scheduling leader sends the cancels
            log.info("fl job %s: %d train tasks cancelled (%s)", self.job_id, changed, reason)
        return changed

    async def _cancel_job_tasks(self, reason: str) -> int:
        """Cancel every train task of the job that has not ended."""
        rounds = await asyncio.to_thread(self.fl.list_rounds, self.job_id)
        return await self._cancel_tasks(rounds, reason)

    async def _load_weights(self, digest: str) -> tuple[dict[str, Any], int]:
        data = await asyncio.to_thread(self.registry.read_blob, digest)
        _meta, arrays = await asyncio.to_thread(decode_weights, data, max_bytes=MAX_DECODE_BYTES)
        return arrays, len(data)

    async def _progress(self, rnd: RoundRecord) -> Progress:
        """Link results to recorded uploads; count what counts, and who is done.

        A device's result is looked up among every result stored for its task, applied or
        not: a task the coordinator took back (the device looked offline, say, as it does to
        a coordinator that just restarted) may still have run to the end on the device, and
        its update counts like any other. A device is done once its update counts, or its
        task ended for a reason the device gave (it failed, refused or expired the task); a
        task taken back from a device that went away is not done before the deadline.
        """

        forced = (
            set((rnd.selection or {}).get("forced") or [])
            if self.job.fairness.wait_for_forced
            else set()
        )

        def done(device: str, tid: str, up: UpdateRecord | None) -> tuple[bool, bool]:
            """(the device's update counts, the device is done)."""
            if up is not None and (up.complete or self._link(rnd.round, device, tid, up)):
                return True, True
            if up is not None:
                return False, False  # uploaded; its result is on its way
            try:
                task = self.store.get_task(tid)
            except NotFoundError:
                return False, False
            if not task.terminal or task.result_id is not None:
                return False, task.terminal
            # Ended without a result: done, unless its device went away (then it may still
            # come back with the update it was training).
            attempts = self.store.attempts(tid)
            return False, not (attempts and attempts[-1].outcome == DEVICE_OFFLINE)

        def check() -> Progress:
            updates = {u.device_id: u for u in self.fl.updates_for(self.job_id, rnd.round)}
            finished = True
            complete = waiting = pending = 0
            for device, tid in rnd.tasks.items():
                up = updates.get(device)
                counts, device_done = done(device, tid, up)
                complete += counts
                waiting += up is not None and not counts
                finished = finished and device_done
                pending += device in forced and not device_done
            return Progress(
                complete=complete, waiting=waiting, finished=finished, forced_pending=pending
            )

        return await asyncio.to_thread(check)

    def _link(self, round_no: int, device: str, task_id: str, up: UpdateRecord) -> bool:
        """Attach the device's successful result naming ``up``'s digest (worker thread)."""
        for result in self.store.results_for(task_id):
            if result.device_id != device or result.status != "succeeded":
                continue
            try:
                out = output_as(TrainOutput, result.output or {})
            except msgspec.ValidationError:
                continue
            if out.update.digest != up.digest or out.examples < 1:
                continue
            examples = out.examples
            metrics = train_metrics(out)
            self.fl.link_result(
                self.job_id,
                round_no,
                device,
                result_id=result.id,
                examples=examples,
                metrics=metrics,
            )
            return True
        return False
