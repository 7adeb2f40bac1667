"""Reading what the devices of a rollout did: ended tasks and (agent releases) the devices'
own update statuses become device states (:mod:`.outcomes`); a model's steps follow one
another here (baseline ``infer``, ``deploy``, probe ``infer``, and a deploy back when the
probe fails). Used by :class:`~.runner.Runner` at the start of each step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from lepton.common.errors import LeptonError
from lepton.coordinator.rollouts import outcomes
from lepton.coordinator.rollouts.outcomes import Measurement
from lepton.coordinator.rollouts.records import RolloutDevice, RolloutRecord
from lepton.coordinator.rollouts.store import RolloutStore
from lepton.coordinator.rollouts.targets import DeviceUpdateLike, Targets
from lepton.coordinator.store import Lease
from lepton.coordinator.store.tasks import TaskRepo
from lepton.coordinator.tasks.request import TaskRequest

#: Device states that wait for news from the device.
WAITING: Final = ("dispatched", "staged", "reverting")
#: An update status settles a device only if it is about the device's own task: a refusal
#: left from an earlier attempt at the same version is not this one's.
FAILED_OUTCOMES: Final = frozenset({"refused", "install_failed", "rolled_back"})


class Reconciler:
    """See module doc. ``submit(request, now)``: store a task, its id; ``count(kind,
    changes)``: metrics of settled devices."""

    def __init__(
        self,
        store: RolloutStore,
        tasks: TaskRepo,
        targets: Targets,
        *,
        submit: Callable[[TaskRequest, float], str],
        count: Callable[[str, Mapping[str, Mapping[str, Any]]], None],
    ) -> None:
        self.store = store
        self.tasks = tasks
        self.targets = targets
        self.submit = submit
        self._count = count

    def reconcile(
        self, rec: RolloutRecord, rows: list[RolloutDevice], now: float, lease: Lease | None
    ) -> bool:
        """Settle the devices under way whose task ended or who reported how their update
        ended; step a model's device on. Returns whether any row changed."""
        waiting = [r for r in rows if r.state in WAITING]
        if not waiting:
            return False
        changes: dict[str, dict[str, Any]] = {}
        if rec.kind == "agent" and self.targets.releases is not None:
            updates = self.targets.releases.updates([r.device_id for r in waiting])
            for r in waiting:
                status = updates.get(r.device_id)
                if status is None or _stale(status, r):
                    continue
                if r.step == "revert":
                    verdict = outcomes.revert_verdict(
                        version=status.version,
                        outcome=status.outcome,
                        reason=status.reason,
                        wanted=r.from_version or "",
                    )
                else:
                    verdict = outcomes.update_verdict(
                        version=status.version,
                        outcome=status.outcome,
                        target=status.target,
                        reason=status.reason,
                        wanted=rec.version,
                    )
                if verdict is not None and verdict[0] != r.state:
                    changes[r.device_id] = settled(verdict, now)
        baselines = [Measurement(**r.baseline) for r in rows if r.baseline]
        for r in waiting:
            if r.device_id in changes or r.task_id is None:
                continue
            task = self.tasks.get_task(r.task_id)
            if not task.terminal:
                continue
            change = self._after_task(
                rec, r, task.state, task.output or {}, task.last_error, baselines, now
            )
            if change is not None:
                changes[r.device_id] = change
        if not changes:
            return False
        expect = {r.device_id: r.state for r in waiting if r.device_id in changes}
        self._count(rec.kind, changes)
        return self.store.update_devices(rec.id, changes, now, expect=expect, lease=lease) > 0

    def _after_task(  # noqa: PLR0917
        self,
        rec: RolloutRecord,
        row: RolloutDevice,
        state: str,
        output: dict[str, Any],
        error: str | None,
        baselines: list[Measurement],
        now: float,
    ) -> dict[str, Any] | None:
        """The change a device's ended task means (None: none)."""
        if state != "succeeded":
            why = f"{row.step} task {state}" + (f": {error}" if error else "")
            if row.step == "probe":
                return self._undo(rec, row, why, now)
            if row.step != "baseline":
                return settled(("failed", why), now)
        if row.step in ("baseline", "deploy", "probe"):
            return self._model_step(
                rec, row, output if state == "succeeded" else None, baselines, now
            )
        if row.step == "install":
            verdict = outcomes.install_verdict(output, rec.version)
        elif row.step == "revert" and rec.kind == "model":
            verdict = ("reverted", "previous version deployed")
        elif row.step == "revert":
            verdict = outcomes.revert_task_verdict(output, row.from_version or "")
        else:
            return None
        return None if verdict[0] == row.state else settled(verdict, now)

    def _model_step(
        self,
        rec: RolloutRecord,
        row: RolloutDevice,
        output: dict[str, Any] | None,
        baselines: list[Measurement],
        now: float,
    ) -> dict[str, Any]:
        """A model's next step after a succeeded task (``output`` None: the baseline failed)."""
        plan = rec.plan
        if row.step == "baseline":
            # No baseline (nothing deployed yet, say): the rollout's median stands in.
            baseline = Measurement.of(output).to_dict() if output is not None else None
            try:
                task_id = self.submit(self.targets.deploy(plan, plan.version, row.device_id), now)
            except LeptonError as exc:
                return settled(("failed", f"deploy not started: {exc}"), now)
            return {"step": "deploy", "reason": "deploy", "task_id": task_id, "baseline": baseline}
        if row.step == "deploy":
            if plan.probe is None:
                return settled(("succeeded", "deployed"), now)
            try:
                task_id = self.submit(self.targets.probe(plan, row.device_id), now)
            except LeptonError as exc:
                return settled(("failed", f"probe not started: {exc}"), now)
            return {"state": "staged", "step": "probe", "reason": "probe", "task_id": task_id}
        assert plan.probe is not None
        assert output is not None
        own = Measurement(**row.baseline) if row.baseline else None
        verdict = outcomes.judge_probe(
            Measurement.of(output),
            own or outcomes.fleet_baseline(baselines),
            max_accuracy_drop=plan.probe.max_accuracy_drop,
            max_latency_increase=plan.probe.max_latency_increase,
        )
        failed = verdict[0] == "failed"
        return self._undo(rec, row, verdict[1], now) if failed else settled(verdict, now)

    def _undo(self, rec: RolloutRecord, row: RolloutDevice, why: str, now: float) -> dict[str, Any]:
        """A model that failed its probe is deployed but not trusted: the device fails, and
        the previous version is deployed back (a task not followed further: the device is
        counted failed either way)."""
        try:
            request = self.targets.revert(rec.plan, rec.id, row.device_id, None)
            task_id = self.submit(request, now)
        except LeptonError as exc:
            return settled(("failed", f"{why}; not taken back: {exc}"), now)
        out = settled(("failed", f"{why}; previous version deployed back"), now)
        return out | {"step": "undo", "task_id": task_id}


def _stale(status: DeviceUpdateLike, row: RolloutDevice) -> bool:
    """A failure status naming another task than the device's current one."""
    task_id = getattr(status, "task_id", None)
    return bool(status.outcome in FAILED_OUTCOMES and task_id and task_id != row.task_id)


def settled(verdict: tuple[str, str], now: float) -> dict[str, Any]:
    state, reason = verdict
    out: dict[str, Any] = {"state": state, "reason": reason}
    if state not in WAITING:
        out["finished_at"] = now
    return out
