"""What a job's runner holds while it runs, and the small parts its round opener and
closer share.

- :class:`JobState`: the job, its record, its strategy, the current global weights, the
  evaluation set, the lease, and the runner's wake-up;
- :class:`JobCode`: runs the job's own code (model factory, evaluation set), durably
  counted;
- :class:`RoundProgress`: reads a round's progress from the database (which updates count,
  who is done), linking results to recorded uploads;
- :class:`JobTasks`: cancels the job's train tasks.

Each gets what it uses in its constructor; :class:`~.runner.JobRunner` builds them for one
job and hands them to :class:`~.opening.RoundOpener` and :class:`~.closing.RoundCloser`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import msgspec
import numpy as np

from lepton.common.errors import LeptonError
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.fl import modelio
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.planning import train_metrics
from lepton.coordinator.fl.jobs.spec import FLJob
from lepton.coordinator.fl.kernels.strategies import Strategy
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.records import JobRecord, RoundRecord, UpdateRecord
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.store import Lease
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.states import DEVICE_OFFLINE
from lepton.protocol.tasks import TrainOutput, output_as
from lepton.protocol.weights import decode_weights

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

    def __init__(self, fl: FLStore, record: JobRecord, lease: Lease) -> None:
        self.fl = fl
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

    def clear_wake(self) -> None:
        self._wake.clear()

    async def reload(self) -> JobRecord:
        self.record = await asyncio.to_thread(self.fl.get_job, self.job_id)
        return self.record

    async def sleep(self, seconds: float) -> None:
        """Up to ``seconds``, or until :meth:`wake`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()


async def load_weights(blobs: ModelRegistry, digest: str) -> tuple[dict[str, Any], int]:
    """The weights blob ``digest`` decoded, and its size."""
    data = await asyncio.to_thread(blobs.read_blob, digest)
    _meta, arrays = await asyncio.to_thread(decode_weights, data, max_bytes=MAX_DECODE_BYTES)
    return arrays, len(data)


class JobCode:
    """Runs one job's own code, durably counted (see :meth:`run`)."""

    def __init__(self, fl: FLStore, policy: JobPolicy, metrics: FLMetrics, state: JobState) -> None:
        self.fl = fl
        self.policy = policy
        self.metrics = metrics
        self.state = state

    async def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` (which calls the job's own code: its model factory, its evaluation
        set) in a worker thread, durably counted.

        The count is written before the call and cleared after it, so a call that ended the
        process (an abort no handler catches) is still counted after a restart; once
        ``fl.max_load_attempts`` calls died that way the job fails as ``crashed_loader``
        instead of running its code again. What the code raises fails the job with the
        reason (:class:`JobFailedError`), never retried.
        """
        job_id = self.state.job_id
        limit = self.policy.max_load_attempts
        died = await asyncio.to_thread(
            self.fl.begin_load, job_id, what, now=time.time(), lease=self.state.lease
        )
        if died >= limit:
            self.metrics.job_failures.labels(CRASHED_LOADER).inc()
            raise JobFailedError(
                f"{CRASHED_LOADER}: the coordinator died {died} times while running the "
                f"job's code ({what}); not run again"
            )
        try:
            result = await asyncio.to_thread(fn, *args)
        except asyncio.CancelledError:
            self.fl.end_load(job_id)  # a shutdown, not a crash: no awaiting once cancelled
            raise
        except modelio.JobCodeError as exc:
            await asyncio.to_thread(self.fl.end_load, job_id)
            self.metrics.job_failures.labels("model_error").inc()
            raise JobFailedError(str(exc)) from exc
        except BaseException:
            await asyncio.to_thread(self.fl.end_load, job_id)
            raise
        await asyncio.to_thread(self.fl.end_load, job_id)
        return result


class JobTasks:
    """Cancels one job's train tasks."""

    def __init__(
        self,
        fl: FLStore,
        cancels: CancelRepo,
        metrics: FLMetrics,
        on_submit: Callable[[], None],
        job_id: str,
    ) -> None:
        self.fl = fl
        self.cancels = cancels
        self.metrics = metrics
        self.on_submit = on_submit
        self.job_id = job_id

    async def cancel(self, rounds: Sequence[RoundRecord], reason: str) -> int:
        """Cancel the train tasks of these rounds that have not ended (pending ones at once,
        assigned or running ones through their devices); returns how many this changed."""
        ids = sorted({tid for r in rounds for tid in r.tasks.values()})
        if not ids:
            return 0
        outcomes = await asyncio.to_thread(self.cancels.cancel_tasks, ids, reason, time.time())
        changed = sum(o.changed for o in outcomes)
        if changed:
            self.metrics.tasks_cancelled.labels(reason).inc(changed)
            self.on_submit()  # the scheduling leader sends the cancels
            log.info("fl job %s: %d train tasks cancelled (%s)", self.job_id, changed, reason)
        return changed

    async def cancel_all(self, reason: str) -> int:
        """Cancel every train task of the job that has not ended."""
        rounds = await asyncio.to_thread(self.fl.list_rounds, self.job_id)
        return await self.cancel(rounds, reason)


class RoundProgress:
    """Reads one job's round progress from the FL store, tasks and their results."""

    def __init__(self, fl: FLStore, tasks: TaskRepo, results: ResultRepo, state: JobState) -> None:
        self.fl = fl
        self.tasks = tasks
        self.results = results
        self.state = state

    async def read(self, rnd: RoundRecord) -> Progress:
        """Link results to recorded uploads; count what counts, and who is done.

        A device's result is looked up among every result stored for its task, applied or
        not: a task the coordinator took back (the device looked offline, say, as it does to
        a coordinator that just restarted) may still have run to the end on the device, and
        its update counts like any other. A device is done once its update counts, or its
        task ended for a reason the device gave (it failed, refused or expired the task); a
        task taken back from a device that went away is not done before the deadline.
        """

        job_id = self.state.job_id
        forced = (
            set((rnd.selection or {}).get("forced") or [])
            if self.state.job.fairness.wait_for_forced
            else set()
        )

        def done(device: str, tid: str, up: UpdateRecord | None) -> tuple[bool, bool]:
            """(the device's update counts, the device is done)."""
            if up is None:
                try:
                    task = self.tasks.get_task(tid)
                except NotFoundError:
                    return False, False
                if not task.terminal:
                    return False, False
                if task.result_id is None:
                    # Ended without a result: done, unless its device went away (then it
                    # may still come back with the update it was training).
                    attempts = self.tasks.attempts(tid)
                    return False, not (attempts and attempts[-1].outcome == DEVICE_OFFLINE)
                # It ended with a result. A device uploads before it sends its result, so
                # an update recorded after the round's updates were read is there now:
                # without this second look, a round could close without an update that
                # arrived in the meantime.
                up = self.fl.update_of(job_id, rnd.round, device)
                if up is None:
                    return False, True  # finished without an update that counts
            if up.complete or self.link(rnd.round, device, tid, up):
                return True, True
            return False, False  # uploaded; its result is on its way

        def check() -> Progress:
            updates = {u.device_id: u for u in self.fl.updates_for(job_id, rnd.round)}
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

    def link(self, round_no: int, device: str, task_id: str, up: UpdateRecord) -> bool:
        """Attach the device's successful result naming ``up``'s digest (worker thread)."""
        for result in self.results.results_for(task_id):
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
                self.state.job_id,
                round_no,
                device,
                result_id=result.id,
                examples=examples,
                metrics=metrics,
            )
            return True
        return False
