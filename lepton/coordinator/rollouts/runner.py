"""One step of one rollout on the leader: read what the devices did, ask the kernel, act.

:meth:`Runner.tick` (synchronous, from a worker thread) first *reconciles*: the tasks of
devices under way that ended, and (agent releases) the devices' own update statuses, become
device states (:mod:`.outcomes`); a model's steps follow one another here (baseline
``infer``, ``deploy``, probe ``infer``). Then late joiners (devices matching the selector
that are not in the rollout yet) join the pending pool, :func:`~.engine.decide` says what
to do, and the runner does it: marks, task submissions through the normal task path
(:func:`~lepton.coordinator.tasks.submit.build_task`), the rollout's own state. Reading the
state afresh each step is what makes a new leader pick a rollout up where the last one left
it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from prometheus_client import CollectorRegistry

from lepton.common.errors import LeptonError
from lepton.coordinator.config import Config
from lepton.coordinator.rollouts.engine import ENDED, TERMINAL, decide, order
from lepton.coordinator.rollouts.metrics import RolloutMetrics
from lepton.coordinator.rollouts.reconcile import WAITING, Reconciler
from lepton.coordinator.rollouts.records import RolloutDevice, RolloutRecord
from lepton.coordinator.rollouts.store import RolloutStore
from lepton.coordinator.rollouts.targets import Targets
from lepton.coordinator.store import DeviceRecord, Lease, NewTask
from lepton.coordinator.store.cancels import CancelRepo
from lepton.coordinator.store.devices import DeviceRepo
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.request import TaskRequest
from lepton.coordinator.tasks.submit import build_task

log = logging.getLogger(__name__)

_PAGE: Final = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    """What a step did: ``acted`` (something changed: step again), ``wake_at`` (decide
    again by then at the latest), ``live`` (the rollout still needs ticks)."""

    acted: bool
    wake_at: float | None
    live: bool


class Runner:
    """Steps rollouts (see module doc). ``on_submit(n)``: ``n`` tasks were stored."""

    def __init__(
        self,
        config: Config,
        store: RolloutStore,
        *,
        devices: DeviceRepo,
        tasks: TaskRepo,
        cancels: CancelRepo,
        targets: Targets,
        on_submit: Callable[[int], None],
        metrics: RolloutMetrics | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.devices = devices
        self.tasks = tasks
        self.cancels = cancels
        self.targets = targets
        self.on_submit = on_submit
        self.metrics = metrics or RolloutMetrics(CollectorRegistry())
        self.reconciler = Reconciler(store, tasks, targets, submit=self.submit, count=self._count)

    def fleet(self) -> dict[str, DeviceRecord]:
        out: dict[str, DeviceRecord] = {}
        while True:
            page = self.devices.list_devices(fleet=self.config.fleet, limit=_PAGE, offset=len(out))
            out.update((d.id, d) for d in page)
            if len(page) < _PAGE:
                return out

    def submit(self, request: TaskRequest, now: float) -> str:
        task = self.tasks.submit(build_task(self.config, request, now=now))
        self.on_submit(1)
        return task.id

    # ------------------------------------------------------------------ one step

    def tick(self, rollout_id: str, now: float, *, lease: Lease | None = None) -> Tick:
        rec = self.store.get(rollout_id)
        fleet = self.fleet()
        rows = self.store.devices(rollout_id)
        acted = self.reconciler.reconcile(rec, rows, now, lease)
        if rec.state not in ENDED and not rec.plan.selector.device_ids:
            acted |= self._late_joiners(rec, rows, fleet, now, lease)
        if acted:
            rows = self.store.devices(rollout_id)
        views = [
            r.view(online=r.device_id in fleet and fleet[r.device_id].state == "online")
            for r in rows
        ]
        d = decide(rec.plan.policy(), rec.view(), views, now)
        by_id = {r.device_id: r for r in rows}
        changes: dict[str, dict[str, Any]] = {
            device_id: {"state": state, "reason": reason, "finished_at": now}
            for device_id, (state, reason) in d.marks.items()
        }
        expect = {device_id: by_id[device_id].state for device_id in d.marks}
        self._act(
            rec, start=d.start, revert=d.revert, by_id=by_id, fleet=fleet, now=now,
            changes=changes, expect=expect,
        )  # fmt: skip
        if changes:
            self.store.update_devices(rollout_id, changes, now, expect=expect, lease=lease)
        stuck = [
            by_id[device_id].task_id
            for device_id, (state, _) in d.marks.items()
            if state == "timed_out" and by_id[device_id].task_id
        ]
        if stuck:
            # Its device is told to stop (if it ever answers); a late success is not taken.
            self.cancels.cancel_tasks([t for t in stuck if t], "rollout: device timed out", now)
        values: dict[str, Any] = {}
        if (d.state, d.phase) != (rec.state, rec.phase):
            values |= {"state": d.state, "phase": d.phase}
        if d.reason and d.reason != rec.reason:
            values["reason"] = d.reason
        if d.revert_all and not rec.revert:
            values["revert"] = True
        if values:
            log.info("rollout %s: %s", rollout_id, values)
            written = self.store.set_rollout(
                rollout_id, now, expect=rec.state, lease=lease, **values
            )
            if written and values.get("state") in ENDED:
                self.metrics.ended.labels(rec.kind, values["state"]).inc()
        self._count(rec.kind, changes)
        acted = acted or bool(changes) or bool(values)
        live = d.state not in ENDED or bool(d.revert) or any(r.state in WAITING for r in rows)
        return Tick(acted=acted, wake_at=d.wake_at, live=live)

    def _count(self, kind: str, changes: Mapping[str, Mapping[str, Any]]) -> None:
        for change in changes.values():
            state = change.get("state")
            if state in TERMINAL:
                self.metrics.devices.labels(kind, state).inc()

    # ------------------------------------------------------------------ acting

    def _act(
        self,
        rec: RolloutRecord,
        *,
        start: Sequence[str],
        revert: Sequence[str],
        by_id: Mapping[str, RolloutDevice],
        fleet: Mapping[str, DeviceRecord],
        now: float,
        changes: dict[str, dict[str, Any]],
        expect: dict[str, str],
    ) -> None:
        """Start and revert the devices the kernel chose; their tasks go in one batch."""
        new_tasks: dict[str, NewTask] = {}
        running = self._running_versions(rec, start, fleet)
        for device_id in start:
            change, task = self._start(
                rec, by_id[device_id], fleet.get(device_id), running.get(device_id), now
            )
            changes[device_id] = change
            expect[device_id] = "pending"
            if task is not None:
                new_tasks[device_id] = task
        for device_id in revert:
            change, task = self._revert(rec, by_id[device_id], now)
            changes[device_id] = change
            expect[device_id] = "succeeded"
            if task is not None:
                new_tasks[device_id] = task
        self._submit_all(new_tasks, changes, now)

    def _submit_all(
        self, new: Mapping[str, NewTask], changes: dict[str, dict[str, Any]], now: float
    ) -> None:
        """Store a step's tasks in one transaction; if that fails, none started."""
        if not new:
            return
        try:
            self.tasks.submit_many(list(new.values()))
        except LeptonError as exc:
            for device_id in new:
                changes[device_id] = {
                    "state": "failed",
                    "reason": f"not started: {exc}",
                    "finished_at": now,
                }
            return
        self.on_submit(len(new))

    def _start(
        self,
        rec: RolloutRecord,
        row: RolloutDevice,
        device: DeviceRecord | None,
        running: str | None,
        now: float,
    ) -> tuple[dict[str, Any], NewTask | None]:
        """The device's change and its first task (stored by :meth:`_submit_all`)."""
        plan = rec.plan
        try:
            if plan.kind == "agent":
                request = self.targets.install(
                    plan, rec.id, row.device_id, device.device_class if device else None
                )
                step = "install"
                # Nothing this rollout changes on a device already on the version: no revert.
                from_version = None if running == plan.version else running
            elif plan.probe is not None:
                request, step, from_version = (
                    self.targets.probe(plan, row.device_id),
                    "baseline",
                    None,
                )
            else:
                request, step, from_version = (
                    self.targets.install(plan, rec.id, row.device_id, None),
                    "deploy",
                    None,
                )
            task = build_task(self.config, request, now=now)
        except LeptonError as exc:
            return {"state": "failed", "reason": f"not started: {exc}", "finished_at": now}, None
        return {
            "state": "dispatched",
            "reason": step,
            "step": step,
            "task_id": task.id,
            "from_version": from_version,
            "started_at": now,
        }, task

    def _running_versions(
        self, rec: RolloutRecord, device_ids: Sequence[str], fleet: Mapping[str, DeviceRecord]
    ) -> dict[str, str | None]:
        """What each agent runs: its update status, else the version its birth announced
        (one query for the whole step)."""
        if rec.kind != "agent" or not device_ids:
            return {}
        statuses = (
            self.targets.releases.updates(list(device_ids))
            if self.targets.releases is not None
            else {}
        )
        out: dict[str, str | None] = {}
        for device_id in device_ids:
            status = statuses.get(device_id)
            device = fleet.get(device_id)
            if status is not None:
                out[device_id] = status.version
            else:
                out[device_id] = (device.agent_version or None) if device is not None else None
        return out

    def _revert(
        self, rec: RolloutRecord, row: RolloutDevice, now: float
    ) -> tuple[dict[str, Any], NewTask | None]:
        if rec.kind == "agent" and row.from_version is None:
            reason = "not reverted: it ran this version before the rollout (or nothing known)"
            return {"state": "skipped", "reason": reason, "finished_at": now}, None
        try:
            request = self.targets.revert(rec.plan, rec.id, row.device_id, row.from_version)
            task = build_task(self.config, request, now=now)
        except LeptonError as exc:
            failed = {"state": "failed", "reason": f"revert not started: {exc}", "finished_at": now}
            return failed, None
        return {
            "state": "reverting",
            "reason": "revert",
            "step": "revert",
            "task_id": task.id,
            "started_at": now,
        }, task

    def _late_joiners(
        self,
        rec: RolloutRecord,
        rows: list[RolloutDevice],
        fleet: Mapping[str, DeviceRecord],
        now: float,
        lease: Lease | None,
    ) -> bool:
        have = {r.device_id for r in rows}
        selector = rec.plan.selector.selector()
        fits = self.targets.class_filter(rec.plan)
        new = [
            (d.id, d.device_class)
            for d in fleet.values()
            if d.id not in have and selector.matches(d) and fits(d.device_class)
        ]
        if new:
            busy = self.store.busy(rec.kind, [d for d, _ in new])
            new = [(d, c) for d, c in new if busy.get(d, rec.id) == rec.id]
        if not new:
            return False
        return self.store.add_devices(rec.id, order(rec.id, new), now, lease=lease) > 0
