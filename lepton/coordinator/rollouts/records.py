"""A rollout and one of its devices as plain values (what :mod:`.store` returns)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lepton.coordinator.rollouts.engine import DeviceView, RolloutView
from lepton.coordinator.rollouts.plan import Plan, plan_of


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutRecord:
    id: str
    kind: str
    name: str
    version: str
    plan: Plan
    state: str
    phase: int
    approved: tuple[int, ...]
    revert: bool
    reason: str
    created_by: str
    created_at: float
    updated_at: float
    ended_at: float | None

    @classmethod
    def of(cls, row: Any) -> RolloutRecord:
        values = dict(row)
        values["plan"] = plan_of(values["plan"])
        values["approved"] = tuple(sorted(int(p) for p in values["approved"]))
        return cls(**values)

    def view(self) -> RolloutView:
        return RolloutView(
            state=self.state,  # type: ignore[arg-type]
            phase=self.phase,
            approved=frozenset(self.approved),
            revert=self.revert,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "name": self.name,
            "version": self.version,
            "plan": self.plan.to_dict(),
            "state": self.state,
            "phase": self.phase,
            "phases": len(self.plan.phases),
            "approved": list(self.approved),
            "revert": self.revert,
            "reason": self.reason,
            "created_by": self.created_by,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "ended_at": self.ended_at,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class RolloutDevice:
    rollout_id: str
    device_id: str
    seq: int
    state: str
    reason: str
    step: str | None
    task_id: str | None
    from_version: str | None
    baseline: dict[str, Any] | None
    started_at: float | None
    finished_at: float | None
    updated_at: float

    @classmethod
    def of(cls, row: Any) -> RolloutDevice:
        return cls(**dict(row))

    def view(self, *, online: bool) -> DeviceView:
        return DeviceView(
            id=self.device_id,
            seq=self.seq,
            state=self.state,  # type: ignore[arg-type]
            online=online,
            started_at=self.started_at,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "seq": self.seq,
            "state": self.state,
            "reason": self.reason,
            "step": self.step,
            "task_id": self.task_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "updated_at": self.updated_at,
        }
