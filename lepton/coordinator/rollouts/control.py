"""Creating rollouts and an operator's moves on them (used by the routes, from the thread
pool); the leader's loop does the rest (:mod:`.feature`).

:meth:`RolloutControl.create` checks the plan and its target, chooses the devices (the
selector over the whole fleet, offline ones too: the plan's offline policy says what
becomes of them; named ids must exist), orders them (:func:`~.engine.order`) and stores a
running rollout. Pause, resume, abort (optionally taking updated devices back) and approve
are checked against the rollout's state in their transaction. Each wakes the leader.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lepton.coordinator.config import Config
from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.rollouts.engine import order
from lepton.coordinator.rollouts.plan import Plan, PlanError
from lepton.coordinator.rollouts.records import RolloutRecord
from lepton.coordinator.rollouts.store import RolloutStore
from lepton.coordinator.rollouts.targets import Targets
from lepton.coordinator.store import DeviceRecord
from lepton.coordinator.store.devices import DeviceRepo

_PAGE = 1000


def new_rollout_id() -> str:
    return f"ro-{secrets.token_hex(6)}"


@dataclass(frozen=True, slots=True)
class RolloutControl:
    """The operator's side of rollouts (see module doc)."""

    config: Config
    store: RolloutStore
    devices: DeviceRepo
    targets: Targets
    wake: Callable[[], None] = lambda: None

    def create(self, plan: Plan, *, created_by: str, now: float | None = None) -> RolloutRecord:
        """A new running rollout of ``plan``; :class:`PlanError` (or the target's
        :class:`~.targets.TargetError`) when it cannot run, :class:`NotFoundError` for an
        unknown model version or device id, :class:`ConflictError` when a chosen device is
        in another unended rollout of the same kind."""
        now = time.time() if now is None else now
        plan.check()
        self.targets.check(plan)
        chosen = self.choose(plan)
        if not chosen:
            raise PlanError(f"no device matches {plan.selector.selector().describe()}")
        busy = self.store.busy(plan.kind, [d.id for d in chosen])
        if busy:
            named = ", ".join(f"{d} ({r})" for d, r in sorted(busy.items())[:5])
            more = f" and {len(busy) - 5} more" if len(busy) > 5 else ""
            raise ConflictError(
                "rollout", plan.target(), f"devices in another {plan.kind} rollout: {named}{more}"
            )
        rollout_id = new_rollout_id()
        ids = order(rollout_id, [(d.id, d.device_class) for d in chosen])
        rec = self.store.create(rollout_id, plan, ids, created_by=created_by, now=now)
        self.wake()
        return rec

    def choose(self, plan: Plan) -> list[DeviceRecord]:
        selector = plan.selector.selector()
        fleet = self.config.fleet
        if selector.device_ids:
            named = []
            for device_id in selector.device_ids:
                device = self.devices.get_device(device_id)
                if device.fleet != fleet:
                    raise NotFoundError("device", device_id)
                named.append(device)
            candidates = named
        else:
            candidates = []
            while True:
                page = self.devices.list_devices(fleet=fleet, limit=_PAGE, offset=len(candidates))
                candidates += page
                if len(page) < _PAGE:
                    break
        fits = self.targets.class_filter(plan)
        return [d for d in candidates if selector.matches(d) and fits(d.device_class)]

    def move(
        self, rollout_id: str, action: str, *, actor: str, revert: bool = False
    ) -> RolloutRecord:
        """Pause, resume, abort or approve (a :class:`ConflictError` when the state does
        not allow it)."""
        rec = self.store.transition(rollout_id, action, time.time(), revert=revert, actor=actor)
        self.wake()
        return rec

    def status(
        self,
        rollout_id: str,
        *,
        devices: bool = True,
        state: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> dict[str, Any]:
        """The rollout, its devices per state and (``devices``) a page of its device rows."""
        rec = self.store.get(rollout_id)
        counts = self.store.counts(rollout_id)
        out: dict[str, Any] = {**rec.to_dict(), "counts": counts, "total": sum(counts.values())}
        if devices:
            rows = self.store.devices(rollout_id, state=state, limit=limit, offset=offset)
            out["devices"] = [r.to_dict() for r in rows]
        return out
