"""The round engine: runs federated jobs on the leader, one round at a time, crash-safe.

For each active job, one :class:`JobRunner` task (leader only, cancelled when the term ends):

1. **prepare** (once): build the model, write its first weights as a blob, record the
   tensor layout updates must match, the update size cap and the FLOPs per example;
2. **open** a round: choose devices (:mod:`.planning`), give each an update slot and a
   pinned ``train`` task (one attempt, expiring at the round's deadline), and record the
   round (selection, slots, task ids, absolute deadline) before submitting the tasks; the
   slot's upload credential is added to the task's message only as it is sent
   (:mod:`.credentials`);
3. **wait** until ``clients_per_round`` updates count, or the deadline passes with at least
   ``min_results`` (an update whose result is still on its way gets ``result_grace_s``
   more), or every selected device has finished. Waiting wakes on recorded uploads and
   applied results, with a slow re-check as a safety net for work another replica applied;
4. **close**: aggregate the counted updates with the job's strategy, write the new weights
   (and the strategy's state) as blobs, evaluate centrally, and in one transaction close
   the round and move the job on. A round short of ``min_results`` at its deadline is
   extended with more devices, up to ``max_round_attempts`` times; then the job fails;
5. at the end, **register** the final model (FP32 ONNX) in the model registry under the
   job's name, where it can be quantized and deployed like any other model.

An update counts once both its upload is recorded (``fl_updates``, written before the
device's upload is answered) and the device's train result, naming the same digest, has
been applied (written before the result is acknowledged). Neither is lost when the
coordinator dies: the upload is in the database, and the agent re-sends an unacknowledged
result. A restarted leader finds the open round in the database (selection, slots,
deadline, updates so far), re-submits any task it had not submitted yet (task ids are
stable, so this is a no-op when it had), and carries on; UNIQUE(job, round, device) means a
device's update counts once however often it is sent. Late updates (their round closed)
are refused with 409 ``late`` and counted, unless the job folds them (``[late] policy =
"fold"``): then one at most ``late.max_rounds`` rounds late is recorded under its own
round and aggregated, discounted, by the next round to close (:mod:`.closing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from lepton.coordinator.config import Config
from lepton.coordinator.errors import LeaseLostError
from lepton.coordinator.fl.credentials import UploadSigner
from lepton.coordinator.fl.jobs import planning
from lepton.coordinator.fl.jobs.admission import JobPolicy
from lepton.coordinator.fl.jobs.progress import JobFailedError
from lepton.coordinator.fl.jobs.runner import JobRunner
from lepton.coordinator.fl.jobs.spec import JobError
from lepton.coordinator.fl.metrics import FLMetrics
from lepton.coordinator.fl.records import ACTIVE_STATES, JobRecord
from lepton.coordinator.fl.store import FLStore
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.scheduler import CostModel, CostWeights, ThroughputEstimator
from lepton.coordinator.store import Lease, ResultOutcome
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.protocol.aio import cancel_and_wait

__all__ = ["FLEngine", "JobFailedError", "JobRunner"]

log = logging.getLogger(__name__)


class FLEngine:
    """Runs every active federated job while this process leads (see module doc)."""

    def __init__(
        self,
        cfg: Config,
        fl: FLStore,
        registry: ModelRegistry,
        metrics: FLMetrics,
        *,
        devices: DeviceRepo,
        tasks: TaskRepo,
        results: ResultRepo,
        cancels: CancelRepo,
        base_url: Callable[[], str],
        estimator: Callable[[], ThroughputEstimator],
        weights: CostWeights,
        on_submit: Callable[[], None] = lambda: None,
        policy: JobPolicy | None = None,
        signer: UploadSigner | None = None,
    ) -> None:
        self.cfg = cfg
        #: What jobs may name (import paths, evaluation files), from ``cfg``'s ``[fl]``.
        self.policy = policy or JobPolicy.of(cfg)
        #: Upload credentials of update slots (see :mod:`.credentials`).
        self.signer = signer
        self.devices = devices
        self.tasks = tasks
        self.results = results
        self.cancels = cancels
        self.fl = fl
        self.registry = registry
        self.metrics = metrics
        self.base_url = base_url
        self.estimator = estimator
        self.weights = weights
        self.on_submit = on_submit
        self._wake = asyncio.Event()
        self._runners: dict[str, JobRunner] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ waking

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def wake(self) -> None:
        """Re-check jobs and rounds soon (event loop thread)."""
        self._wake.set()
        for runner in self._runners.values():
            runner.wake()

    def wake_threadsafe(self) -> None:
        """:meth:`wake` from any thread (upload handlers, the result worker)."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.wake)

    def on_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        """Results were applied (worker thread): wake the rounds waiting on train tasks."""
        if any(o.outcome == "applied" and o.task_kind == planning.KIND for o in outcomes):
            self.wake_threadsafe()

    def cost_model(self) -> CostModel:
        return CostModel(self.weights, self.estimator())

    def runner(self, record: JobRecord, lease: Lease) -> JobRunner:
        """The runner of job ``record`` for one term (:class:`~.spec.JobError` if its
        stored spec cannot be read)."""
        return JobRunner(
            record,
            lease,
            fl=self.fl,
            devices=self.devices,
            tasks=self.tasks,
            results=self.results,
            cancels=self.cancels,
            registry=self.registry,
            cfg=self.cfg,
            policy=self.policy,
            metrics=self.metrics,
            planner=self.cost_model,
            urls=self.base_url,
            on_submit=self.on_submit,
        )

    # ------------------------------------------------------------------ leading

    async def lead(self, lease: Lease) -> None:
        """One term of leadership: a runner per active job, until the term ends."""
        self.bind(asyncio.get_running_loop())
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            while True:
                self._wake.clear()
                for job_id, task in list(tasks.items()):
                    if task.done():
                        del tasks[job_id]
                        self._runners.pop(job_id, None)
                        if not task.cancelled() and isinstance(task.exception(), LeaseLostError):
                            raise task.exception()  # type: ignore[misc]
                jobs = await asyncio.to_thread(self.fl.list_jobs, states=ACTIVE_STATES)
                for job in jobs:
                    if job.id not in tasks:
                        try:
                            runner = self.runner(job, lease)
                        except JobError as exc:  # a stored spec this version cannot read
                            await asyncio.to_thread(
                                self.fl.update_job,
                                job.id,
                                state="failed",
                                error=f"unreadable job spec: {exc}",
                                finished_at=time.time(),
                                lease=lease,
                            )
                            continue
                        self._runners[job.id] = runner
                        tasks[job.id] = asyncio.create_task(runner.run(), name=f"fl-{job.id}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await self._wake.wait()
        finally:
            await cancel_and_wait(tasks.values())
            self._runners.clear()
