"""The control worker: applies births and wills, task acks and results, then acks results.

Drains the ingest :class:`~lepton.coordinator.runtime.ingest.Inbox` in batches on the event loop;
database work runs in a worker thread. A result is acknowledged (``ResultAck`` on
``cmd/{device}/result-ack``) only after the transaction that applied it committed, so the agent
never drops a result the coordinator could still lose. Every replica runs this worker for the share
of traffic the broker gives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Container, Sequence
from typing import Final, TypeVar

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.runtime.ingest import Inbound, Inbox
from lepton.coordinator.runtime.mqtt import MqttLink
from lepton.coordinator.store import ResultOutcome, StateUpdate
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.results import ResultRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.protocol import codec, topics
from lepton.protocol.messages import Result, ResultAck, State, TaskAck

log = logging.getLogger(__name__)

T = TypeVar("T")

ACK_IDS_PER_MESSAGE: Final = 1000
DB_RETRIES: Final = (0.25, 1.0, 4.0)
# Result outcomes counted as ingest rejects (the rest are normal).
REJECTED_RESULTS: Final = frozenset({"replayed", "spoofed", "unknown_task", "unknown_device"})


def per_device_order(batch: Sequence[Inbound]) -> list[list[Inbound]]:
    """``batch`` cut into segments in which no device's state follows one of its own acks or
    results, so applying each segment's states first keeps every device's own order."""
    segments: list[list[Inbound]] = [[]]
    worked: set[str] = set()
    for m in batch:
        if isinstance(m.message, State) and m.device_id in worked:
            segments.append([])
            worked = set()
        segments[-1].append(m)
        if isinstance(m.message, (TaskAck, Result)):
            worked.add(m.device_id)
    return [s for s in segments if s]


class Control:
    """Applies control messages to the store (see module doc)."""

    def __init__(
        self,
        devices: DeviceRepo,
        tasks: TaskRepo,
        results: ResultRepo,
        link: MqttLink,
        metrics: Metrics,
        *,
        inbox: Inbox,
        fleet: str,
        on_requeue: Callable[[], None] = lambda: None,
        on_results: Callable[[Sequence[ResultOutcome]], None] = lambda _outcomes: None,
        on_states: Callable[[Sequence[StateUpdate]], None] = lambda _states: None,
        revoked: Container[str] = frozenset(),
    ) -> None:
        self.devices = devices
        self.tasks = tasks
        self.results = results
        self.link = link
        self.metrics = metrics
        self.inbox = inbox
        self.fleet = fleet
        self.on_requeue = on_requeue
        # Called (worker thread) after a batch of results committed: the features react
        # (federated rounds wait on their train tasks' results).
        self.on_results = on_results
        # Called (worker thread) with a batch of births and wills once applied: the release
        # registry stores the devices' update status. An exception retries the batch.
        self.on_states = on_states
        # Revoked devices: what they sent before the ingest learnt of it, still queued here,
        # is not applied either (a late birth would bring a revoked device back online).
        self.revoked = revoked
        self._stopping = False
        self._waiting = False

    async def run(self) -> None:
        """Apply batches until :meth:`request_stop`; a batch in progress is finished."""
        while not self._stopping:
            self._waiting = True
            try:
                batch = await self.inbox.get_batch()
            finally:
                self._waiting = False
            await self.process(batch)

    def request_stop(self) -> bool:
        """Stop after the current batch; True when idle (the caller may cancel run())."""
        self._stopping = True
        return self._waiting

    async def drain(self) -> None:
        """Apply whatever is still queued (shutdown)."""
        batch = self.inbox.take_all()
        if batch:
            await self.process(batch)

    async def process(self, batch: Sequence[Inbound]) -> None:
        """Apply one batch: births and wills, then acks, then results, each kind in one
        transaction and in arrival order. A device's state that arrived after its own ack or
        result starts a new segment, applied after them: a device that sends its last
        result and then says goodbye (restarting into a new image) has the result applied
        before its going offline takes back what it still runs."""
        kept = [m for m in batch if m.device_id not in self.revoked]
        if len(kept) < len(batch):
            self.metrics.reject("revoked_device", len(batch) - len(kept))
        for segment in per_device_order(kept):
            await self._process_segment(segment)

    async def _process_segment(self, batch: Sequence[Inbound]) -> None:
        states = [
            StateUpdate(m.device_id, self.fleet, m.message, m.received_at, m.retained)
            for m in batch
            if isinstance(m.message, State)
        ]
        acks = [
            (m.device_id, m.message, m.received_at) for m in batch if isinstance(m.message, TaskAck)
        ]
        results = [
            (m.device_id, m.message, m.received_at) for m in batch if isinstance(m.message, Result)
        ]
        if states:
            await self._db("states", self._apply_states, states)
        if acks:
            await self._db("task acks", self._apply_acks, acks)
        if results:
            outcomes = await self._db("results", self._apply_results, results)
            if outcomes:
                await self._ack_results(outcomes)

    async def _db(self, what: str, fn: Callable[..., T], *args: object) -> T | None:
        """Run a store call in a worker thread, retrying transient database errors."""
        for delay in (*DB_RETRIES, None):
            try:
                return await asyncio.to_thread(fn, *args)
            except Exception:
                if delay is None:
                    log.exception("giving up applying %s; devices will re-send", what)
                    return None
                log.warning("applying %s failed; retrying in %.2fs", what, delay, exc_info=True)
                await asyncio.sleep(delay)
        return None

    # ------------------------------------------------------------------ worker thread

    def _apply_states(self, states: Sequence[StateUpdate]) -> None:
        requeued = 0
        for u, ids in zip(states, self.devices.apply_states(states), strict=True):
            if u.message.state == "offline":
                self.metrics.devices_offline.labels("will").inc()
                if ids:
                    log.info("device %s offline (will); requeued %d tasks", u.device_id, len(ids))
            requeued += len(ids)
        if requeued:
            self.metrics.task_transitions.labels("pending").inc(requeued)
            self.on_requeue()
        self.on_states(states)

    def _apply_acks(self, acks: Sequence[tuple[str, TaskAck, float]]) -> None:
        retried = False
        for (device_id, _ack, _t), o in zip(acks, self.tasks.apply_ack_batch(acks), strict=True):
            if o.outcome in ("spoofed", "unknown_task"):
                self.metrics.reject(f"{o.outcome}_ack")
                log.warning("task ack for %s from %s: %s", o.task_id, device_id, o.outcome)
            elif o.task_state is not None and o.outcome != "ignored":
                self.metrics.task_transitions.labels(o.task_state).inc()
            retried = retried or o.outcome == "retry"
        if retried:
            self.on_requeue()

    def _apply_results(self, results: Sequence[tuple[str, Result, float]]) -> list[ResultOutcome]:
        out = self.results.apply_result_batch(results)
        for o in out:
            self.metrics.results.labels(o.outcome).inc()
            if o.outcome in REJECTED_RESULTS:
                self.metrics.reject(o.outcome)
                if o.outcome != "replayed":
                    log.warning(
                        "result %s for task %s from %s rejected: %s",
                        o.result_id,
                        o.task_id,
                        o.device_id,
                        o.outcome,
                    )
            elif o.outcome in ("applied", "cancelled") and o.task_state is not None:
                self.metrics.task_transitions.labels(o.task_state).inc()
        if any(o.outcome == "applied" and o.task_state == "pending" for o in out):
            self.on_requeue()
        if any(o.outcome in ("applied", "cancelled") for o in out):
            self.on_results(out)
        return out

    # ------------------------------------------------------------------ event loop

    async def _ack_results(self, outcomes: Sequence[ResultOutcome]) -> None:
        by_device: dict[str, list[str]] = defaultdict(list)
        for o in outcomes:
            if o.ack:
                by_device[o.device_id].append(o.result_id)
        for device_id, ids in by_device.items():
            topic = topics.cmd_topic(self.fleet, device_id, topics.RESULT_ACK)
            for i in range(0, len(ids), ACK_IDS_PER_MESSAGE):
                payload = codec.encode(ResultAck(ids=ids[i : i + ACK_IDS_PER_MESSAGE]))
                try:
                    await self.link.publish(topic, payload, qos=1)
                except Exception as exc:
                    log.warning(
                        "result ack to %s not sent (%s); it will be re-sent", device_id, exc
                    )
