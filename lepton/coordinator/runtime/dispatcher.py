"""The scheduler loop (leader only): batch pending tasks, plan, commit, publish.

Every ``batch_interval_s`` (sooner after a submission or a requeue) the leader:

1. expires pending tasks past their expiry and handles ack/run timeouts;
2. re-sends assignments whose Task message was not confirmed sent, and sends the cancels
   of assigned or running tasks that their devices have not answered yet (each
   ``tasks.ack_timeout_s``, up to three times, after which the task ends ``cancelled``);
3. folds finished tasks' measured durations into the throughput estimator and persists it;
4. plans the due pending tasks over the online devices (:func:`lepton.coordinator.scheduler.plan`),
   commits the assignments with their explanations (fenced by the lease), and publishes each
   Task to its device at QoS 1, in the plan's start order.

The solver and the explanation run in a worker thread; the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Final

import msgspec

from lepton.coordinator.config import Config
from lepton.coordinator.errors import LeaseLostError
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.mqtt import MqttLink
from lepton.coordinator.scheduler import (
    Candidate,
    ClaimLimits,
    CostModel,
    CostWeights,
    DeviceState,
    Explanation,
    Plan,
    TaskSpec,
    ThroughputEstimator,
    plan,
)
from lepton.coordinator.store import (
    Assignment,
    CancelSend,
    DeviceRecord,
    Dispatch,
    Lease,
    TaskRecord,
)
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.estimates import EstimateRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.protocol import codec, topics
from lepton.protocol.messages import MAX_CANCEL_IDS, CapacityReport, TaskCancel

log = logging.getLogger(__name__)

PUBLISH_CONCURRENCY: Final = 64
UNPLACED_RETRY_MAX_S: Final = 10.0
# The class the scheduler gives a device that reports none (agents always report one), so
# that it has peers to be compared with and a claim limit like any other.
UNCLASSIFIED: Final = "unclassified"
CLAIM_REJECT_REASON: Final = "bench_claim_above_class_limit"


def unplaced_retry_s(waited_s: float, batch_interval_s: float) -> float:
    """When to plan an unplaceable task again: behind the tasks already due (so it never
    crowds a batch), and less often the longer it has waited (a tenth of its wait, at most
    ``UNPLACED_RETRY_MAX_S``), so a backlog of tasks nobody can run costs little."""
    return max(batch_interval_s, min(UNPLACED_RETRY_MAX_S, waited_s / 10.0))


def jsonable(value: Any) -> Any:
    """Plain data safe for JSON columns: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class DeviceViews:
    """Turns registry rows into :class:`DeviceState`, caching the decoded reports.

    A report whose bench claims exceed its device class's plausible maximum is counted once
    (``lepton_ingest_rejects_total{reason="bench_claim_above_class_limit"}``) and logged once
    per device; the estimator believes such a claim only up to the limit.
    """

    def __init__(self, limits: ClaimLimits | None = None, metrics: Metrics | None = None) -> None:
        self.limits = limits if limits is not None else ClaimLimits()
        self.metrics = metrics
        self._reports: dict[str, tuple[float, CapacityReport]] = {}
        self._warned: set[str] = set()

    def build(self, rows: Sequence[DeviceRecord], inflight: dict[str, int]) -> list[DeviceState]:
        out: list[DeviceState] = []
        seen: set[str] = set()
        for row in rows:
            if row.report is None:
                continue  # a birth without a capacity report: nothing to plan with yet
            cached = self._reports.get(row.id)
            if cached is None or cached[0] != row.report_ts:
                try:
                    report = msgspec.convert(row.report, CapacityReport)
                except msgspec.ValidationError:
                    log.warning("stored capacity report of %s is unreadable", row.id)
                    continue
                cached = (row.report_ts, report)
                self._reports[row.id] = cached
                self._check_claims(row.id, report)
            report = cached[1]
            seen.add(row.id)
            # Load the coordinator placed but the report may not show yet.
            load = max(report.slots.busy + report.slots.queued, inflight.get(row.id, 0))
            busy = min(load, report.slots.total)
            out.append(
                DeviceState.from_capacity(
                    row.id,
                    report,
                    online=True,
                    slots_busy=busy,
                    queued=load - busy,
                    device_class=report.device_class or UNCLASSIFIED,
                )
            )
        for gone in set(self._reports) - seen:
            del self._reports[gone]
            self._warned.discard(gone)
        return out

    def _check_claims(self, device_id: str, report: CapacityReport) -> None:
        if report.bench is None:
            return
        cls = report.device_class or UNCLASSIFIED
        over = self.limits.excess(cls, report.bench.fp32_gflops, report.bench.int8_gops)
        if not over:
            return
        if self.metrics is not None:
            self.metrics.reject(CLAIM_REJECT_REASON)
        if device_id not in self._warned:
            self._warned.add(device_id)
            log.warning(
                "device %s claims %s above the plausible maximum of class %s; believed only "
                "up to the limit (fp32 %.0f GFLOP/s, int8 %.0f GOP/s)",
                device_id,
                " and ".join(over),
                cls,
                self.limits.limit(cls, "fp32"),
                self.limits.limit(cls, "int8"),
            )


class Scheduler:
    """Leader-only batch scheduling (see module doc)."""

    def __init__(
        self,
        cfg: Config,
        link: MqttLink,
        metrics: Metrics,
        *,
        devices: DeviceRepo,
        tasks: TaskRepo,
        cancels: CancelRepo,
        estimates: EstimateRepo,
    ) -> None:
        self.cfg = cfg
        self.devices = devices
        self.tasks = tasks
        self.cancels = cancels
        self.estimates = estimates
        self.link = link
        self.metrics = metrics
        self.weights = CostWeights(**dict(cfg.scheduler.weights))
        self.estimator = ThroughputEstimator(limits=self.weights.claim_limits())
        self.views = DeviceViews(self.weights.claim_limits(), metrics)
        self.cycles = 0
        self._wake = asyncio.Event()
        self._devices: dict[str, DeviceState] = {}

    def wake(self) -> None:
        """Plan soon (a task was submitted or came back to pending)."""
        self._wake.set()

    async def lead(self, lease: Lease) -> None:
        """One term of leadership: load the estimator, then cycle until cancelled."""
        snapshot = await asyncio.to_thread(self.estimates.load_estimates)
        self.estimator = ThroughputEstimator(limits=self.weights.claim_limits())
        if snapshot is not None:
            try:
                self.estimator.load(snapshot)
            except (ValueError, TypeError, KeyError):
                log.warning("stored throughput estimates unreadable; starting from bench figures")
        model = CostModel(self.weights, self.estimator)
        failures = 0
        while True:
            if not self.link.connected:
                # Nothing can be sent, and ack deadlines would only run out on work the
                # devices never saw: wait for the link instead of planning into it.
                log.info("broker link down: scheduling waits until it is back")
                await self.link.wait_connected()
            self._wake.clear()
            wait = self.cfg.scheduler.batch_interval_s
            try:
                await self.cycle(lease, model)
                failures = 0
            except LeaseLostError:
                raise
            except Exception:
                failures += 1
                # Back off while the database (say) is away; one log line per attempt.
                wait = min(wait * 2**failures, 30.0)
                log.exception("scheduling cycle failed; next try in %.1fs", wait)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def cycle(self, lease: Lease | None, model: CostModel) -> int:
        """One scheduling pass; returns the number of tasks dispatched."""
        cfg = self.cfg
        now = time.time()
        expired = await asyncio.to_thread(self.tasks.expire_due, now)
        if expired:
            self.metrics.task_transitions.labels("expired").inc(len(expired))
        changed = await asyncio.to_thread(
            self.tasks.sweep_timeouts,
            now,
            ack_timeout_s=cfg.tasks.ack_timeout_s,
            run_timeout_s=cfg.tasks.run_timeout_s,
        )
        for task_id, state in changed:
            if state != "assigned":
                self.metrics.task_transitions.labels(state).inc()
                log.info("task %s timed out; now %s", task_id, state)
        resend = await asyncio.to_thread(
            self.tasks.undispatched, now, older_than_s=cfg.tasks.redispatch_after_s
        )
        if resend:
            log.info("re-sending %d task messages not confirmed sent", len(resend))
            await self._publish(resend)
        await self._cancel(now)
        await self._learn(lease)
        tasks = await asyncio.to_thread(self.tasks.due_pending, now, limit=cfg.scheduler.max_batch)
        self.cycles += 1
        if not tasks:
            return 0
        return await self._place(tasks, lease, model)

    async def _place(self, tasks: list[TaskRecord], lease: Lease | None, model: CostModel) -> int:
        devices = await asyncio.to_thread(self._device_states)
        specs = [TaskSpec.from_record(t) for t in tasks]
        cfg = self.cfg.scheduler
        result, explanations = await asyncio.to_thread(self._solve, specs, devices, model)
        self.metrics.scheduler_solve_seconds.observe(result.solve_s)
        self.metrics.scheduler_batch_tasks.observe(len(specs))
        now = time.time()
        if result.unassigned:
            self.metrics.scheduler_unassigned.inc(len(result.unassigned))
            created = {t.id: t.created_at for t in tasks}
            await asyncio.to_thread(
                self.tasks.note_unassigned,
                result.unassigned,
                explanations,
                now,
                retry_at={
                    tid: now + unplaced_retry_s(now - created[tid], cfg.batch_interval_s)
                    for tid in result.unassigned
                },
            )
        order = list(result.order) or list(result.assignments)
        assignments = [
            Assignment(
                task_id=tid, device_id=result.assignments[tid], explanation=explanations.get(tid)
            )
            for tid in order
        ]
        dispatches = await asyncio.to_thread(self.tasks.assign, assignments, now, lease=lease)
        self.metrics.task_transitions.labels("assigned").inc(len(dispatches))
        log.debug(
            "planned %d tasks on %d devices (%s, %.3fs): %d assigned, %d unassigned",
            len(specs),
            len(devices),
            result.method,
            result.solve_s,
            len(dispatches),
            len(result.unassigned),
        )
        await self._publish(dispatches)
        return len(dispatches)

    def _device_states(self) -> list[DeviceState]:
        rows = self.devices.list_devices(state="online", limit=1_000_000)
        inflight = self.tasks.inflight_by_device()
        states = self.views.build(rows, inflight)
        self._devices = {d.device_id: d for d in states}
        return states

    def _solve(
        self, specs: list[TaskSpec], devices: list[DeviceState], model: CostModel
    ) -> tuple[Plan, dict[str, dict[str, Any]]]:
        cfg = self.cfg.scheduler
        result = plan(specs, devices, model, method=cfg.method, time_budget_s=cfg.time_budget_s)
        return result, self._explain(result, specs, devices, model)

    def _explain(
        self, result: Plan, specs: list[TaskSpec], devices: list[DeviceState], model: CostModel
    ) -> dict[str, dict[str, Any]]:
        """Full explanations (every device compared) while the time budget lasts, then the
        chosen device's cost terms only: a full comparison costs O(devices) per task."""
        deadline = time.perf_counter() + self.cfg.scheduler.time_budget_s
        by_device = {d.device_id: d for d in devices}
        out: dict[str, dict[str, Any]] = {}
        for spec in specs:
            tid = spec.task_id
            if time.perf_counter() < deadline:
                data = result.explain(tid, top=3).to_dict()
                data["complete"] = True
            else:
                chosen = result.assignments.get(tid)
                cands: tuple[Candidate, ...] = ()
                if chosen is not None:
                    terms = model.terms(spec, by_device[chosen])
                    cands = (Candidate(device_id=chosen, chosen=True, terms=terms),)
                data = Explanation(
                    task_id=tid,
                    method=result.method,
                    device_id=chosen,
                    reason=result.unassigned.get(tid),
                    expected_start_s=result.expected_start.get(tid),
                    expected_completion_s=result.expected_completion.get(tid),
                    candidates=cands,
                ).to_dict()
                data["complete"] = False
            data["planned_at"] = time.time()
            out[tid] = jsonable(data)
        return out

    async def _publish(self, dispatches: Sequence[Dispatch]) -> None:
        """Publish Task messages (QoS 1); record the ones the broker accepted."""
        if not dispatches:
            return
        sem = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        fleet = self.cfg.fleet

        async def send(d: Dispatch) -> tuple[str, int] | None:
            async with sem:
                try:
                    topic = topics.cmd_topic(fleet, d.device_id, topics.TASK)
                    await self.link.publish(topic, codec.encode(d.message), qos=1)
                except Exception as exc:
                    self.metrics.dispatch_failures.inc()
                    log.warning("task %s not sent to %s: %s", d.task_id, d.device_id, exc)
                    return None
                return (d.task_id, d.attempt)

        sent = [s for s in await asyncio.gather(*(send(d) for d in dispatches)) if s is not None]
        if sent:
            await asyncio.to_thread(self.tasks.mark_dispatched, sent, time.time())

    async def _cancel(self, now: float) -> None:
        """Give up on cancels no device answered; send the ones due (one message per device
        and reason); record those the broker accepted."""
        wait = self.cfg.tasks.ack_timeout_s
        ended = await asyncio.to_thread(self.cancels.sweep_cancels, now, resend_after_s=wait)
        if ended:
            self.metrics.task_transitions.labels("cancelled").inc(len(ended))
            log.warning("%d tasks cancelled without an answer from their devices", len(ended))
        due = await asyncio.to_thread(self.cancels.cancels_due, now, resend_after_s=wait)
        if not due:
            return
        groups: dict[tuple[str, str], list[CancelSend]] = {}
        for c in due:
            groups.setdefault((c.device_id, c.reason), []).append(c)
        sent: list[str] = []
        for (device_id, reason), items in groups.items():
            ids = [c.task_id for c in items]
            topic = topics.cmd_topic(self.cfg.fleet, device_id, topics.CANCEL)
            for i in range(0, len(ids), MAX_CANCEL_IDS):
                chunk = ids[i : i + MAX_CANCEL_IDS]
                message = TaskCancel(task_ids=chunk, reason=reason[:200])
                try:
                    await self.link.publish(topic, codec.encode(message), qos=1)
                except Exception as exc:
                    self.metrics.dispatch_failures.inc()
                    log.warning("cancel of %d tasks not sent to %s: %s", len(chunk), device_id, exc)
                    continue
                self.metrics.cancels_sent.inc(len(chunk))
                sent.extend(chunk)
        if sent:
            log.info("sent cancels of %d tasks", len(sent))
            await asyncio.to_thread(self.cancels.mark_cancels_sent, sent, time.time())

    async def _learn(self, lease: Lease | None) -> None:
        """Fold measured task durations into the estimator and persist it (exactly once)."""
        observations = await asyncio.to_thread(self.estimates.pending_observations, limit=5000)
        if not observations:
            return
        before = self.estimator.snapshot()
        for o in observations:
            try:
                self.estimator.observe(
                    o.device_id,
                    o.model_class,
                    o.precision,
                    o.demand_gops,
                    o.seconds,
                    device=self._devices.get(o.device_id),
                )
            except ValueError:
                log.warning("ignoring unusable throughput observation %s", o)
        try:
            await asyncio.to_thread(
                self.estimates.save_estimates,
                self.estimator.snapshot(),
                [o.id for o in observations],
                time.time(),
                lease=lease,
            )
        except BaseException:
            self.estimator.load(before)  # not saved: the observations will be read again
            raise
