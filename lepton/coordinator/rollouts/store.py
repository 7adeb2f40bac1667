"""Rollouts and their devices in SQL: every method is one transaction.

Plain values in and out; SQLAlchemy Core over the coordinator store's engine
(:class:`~lepton.coordinator.store.base.StoreBase`), on :mod:`.tables`. Methods are
synchronous (worker threads). The leader's writes pass its lease and are fenced; an
operator's transitions (:meth:`RolloutStore.transition`) lock the rollout row and refuse a
move its state does not allow with a :class:`~lepton.coordinator.errors.ConflictError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

from sqlalchemy import func, insert, select, update

from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.rollouts import tables as t
from lepton.coordinator.rollouts.engine import DEVICE_STATES, ENDED, IN_FLIGHT
from lepton.coordinator.rollouts.plan import Plan
from lepton.coordinator.rollouts.records import RolloutDevice, RolloutRecord
from lepton.coordinator.store import Lease
from lepton.coordinator.store.base import StoreBase, rowcount

#: Operator moves: action -> states it may start from.
MOVES: Final[dict[str, frozenset[str]]] = {
    "pause": frozenset({"running", "waiting_approval"}),
    "resume": frozenset({"paused"}),
    "abort": frozenset({"running", "paused", "waiting_approval"}),
    "approve": frozenset({"waiting_approval", "running", "paused"}),
}
_CHUNK: Final = 500


class RolloutStore(StoreBase):
    """Rollouts and their devices (see module doc). ``RolloutStore(store.engine)``."""

    def create(
        self,
        rollout_id: str,
        plan: Plan,
        device_ids: Sequence[str],
        *,
        created_by: str,
        now: float,
    ) -> RolloutRecord:
        """Store a new running rollout over ``device_ids`` (in rollout order)."""
        with self._write() as s:
            if s.execute(select(t.rollouts.c.id).where(t.rollouts.c.id == rollout_id)).first():
                raise ConflictError("rollout", rollout_id, "id already exists")
            s.execute(
                insert(t.rollouts).values(
                    id=rollout_id,
                    kind=plan.kind,
                    name=plan.name,
                    version=plan.version,
                    plan=plan.to_dict(),
                    state="running",
                    phase=0,
                    approved=[],
                    revert=False,
                    reason="",
                    created_by=created_by[:128],
                    created_at=now,
                    updated_at=now,
                )
            )
            self._insert_devices(s, rollout_id, device_ids, 0, now)
            row = s.execute(select(t.rollouts).where(t.rollouts.c.id == rollout_id)).mappings()
            return RolloutRecord.of(row.one())

    @staticmethod
    def _insert_devices(
        s: Any, rollout_id: str, ids: Sequence[str], first: int, now: float
    ) -> None:
        rows = [
            {
                "rollout_id": rollout_id,
                "device_id": device_id,
                "seq": first + i,
                "state": "pending",
                "reason": "",
                "updated_at": now,
            }
            for i, device_id in enumerate(ids)
        ]
        for i in range(0, len(rows), _CHUNK):
            s.execute(insert(t.rollout_devices), rows[i : i + _CHUNK])

    def add_devices(
        self, rollout_id: str, device_ids: Sequence[str], now: float, *, lease: Lease | None = None
    ) -> int:
        """Late joiners: append the ids not yet in the rollout, after the others."""
        with self._write(lease) as s:
            have = set(
                s.scalars(
                    select(t.rollout_devices.c.device_id).where(
                        t.rollout_devices.c.rollout_id == rollout_id
                    )
                )
            )
            new = [d for d in dict.fromkeys(device_ids) if d not in have]
            if new:
                top = s.scalar(
                    select(func.max(t.rollout_devices.c.seq)).where(
                        t.rollout_devices.c.rollout_id == rollout_id
                    )
                )
                self._insert_devices(s, rollout_id, new, (top or 0) + 1 if have else 0, now)
            return len(new)

    def get(self, rollout_id: str) -> RolloutRecord:
        with self._read() as s:
            row = s.execute(select(t.rollouts).where(t.rollouts.c.id == rollout_id)).mappings()
            found = row.first()
        if found is None:
            raise NotFoundError("rollout", rollout_id)
        return RolloutRecord.of(found)

    def list_rollouts(
        self, *, states: Iterable[str] | None = None, limit: int = 100, offset: int = 0
    ) -> list[RolloutRecord]:
        """Rollouts, newest first."""
        query = (
            select(t.rollouts)
            .order_by(t.rollouts.c.created_at.desc(), t.rollouts.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if states is not None:
            query = query.where(t.rollouts.c.state.in_(list(states)))
        with self._read() as s:
            return [RolloutRecord.of(r) for r in s.execute(query).mappings()]

    def live(self) -> list[RolloutRecord]:
        """Rollouts the leader still ticks: not ended, or ended with devices still under way
        (in flight, reverting, or succeeded under a revert)."""

        def having(*states: str) -> Any:
            return (
                select(t.rollout_devices.c.rollout_id)
                .where(t.rollout_devices.c.state.in_(states))
                .distinct()
            )

        query = select(t.rollouts).where(
            t.rollouts.c.state.not_in(list(ENDED))
            | t.rollouts.c.id.in_(having(*IN_FLIGHT, "reverting"))
            | (t.rollouts.c.revert.is_(True) & t.rollouts.c.id.in_(having("succeeded")))
        )
        with self._read() as s:
            return [RolloutRecord.of(r) for r in s.execute(query).mappings()]

    def busy(self, kind: str, device_ids: Sequence[str] | None = None) -> dict[str, str]:
        """Device id -> the unended rollout of ``kind`` holding it (among ``device_ids``;
        None: all). A device takes part in one rollout of a kind at a time."""
        query = (
            select(t.rollout_devices.c.device_id, t.rollouts.c.id)
            .join(t.rollouts, t.rollouts.c.id == t.rollout_devices.c.rollout_id)
            .where(t.rollouts.c.kind == kind, t.rollouts.c.state.not_in(list(ENDED)))
        )
        out: dict[str, str] = {}
        with self._read() as s:
            if device_ids is None:
                out.update((d, r) for d, r in s.execute(query).all())
                return out
            for i in range(0, len(device_ids), _CHUNK):
                chunk = list(device_ids[i : i + _CHUNK])
                rows = s.execute(query.where(t.rollout_devices.c.device_id.in_(chunk))).all()
                out.update((d, r) for d, r in rows)
        return out

    def devices(
        self,
        rollout_id: str,
        *,
        state: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[RolloutDevice]:
        """The rollout's devices in rollout order."""
        query = (
            select(t.rollout_devices)
            .where(t.rollout_devices.c.rollout_id == rollout_id)
            .order_by(t.rollout_devices.c.seq)
            .offset(offset)
        )
        if state is not None:
            query = query.where(t.rollout_devices.c.state == state)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as s:
            return [RolloutDevice.of(r) for r in s.execute(query).mappings()]

    def counts(self, rollout_id: str) -> dict[str, int]:
        """Devices per state (every state present)."""
        with self._read() as s:
            rows = s.execute(
                select(t.rollout_devices.c.state, func.count())
                .where(t.rollout_devices.c.rollout_id == rollout_id)
                .group_by(t.rollout_devices.c.state)
            ).all()
        out = dict.fromkeys(DEVICE_STATES, 0)
        out.update({state: int(n) for state, n in rows})
        return out

    def by_task(self, task_ids: Sequence[str]) -> list[RolloutDevice]:
        """Rollout devices working on one of ``task_ids``."""
        out: list[RolloutDevice] = []
        with self._read() as s:
            for i in range(0, len(task_ids), _CHUNK):
                chunk = list(task_ids[i : i + _CHUNK])
                query = select(t.rollout_devices).where(t.rollout_devices.c.task_id.in_(chunk))
                out += [RolloutDevice.of(r) for r in s.execute(query).mappings()]
        return out

    def waiting_on_devices(self, device_ids: Sequence[str]) -> list[RolloutDevice]:
        """Rows of ``device_ids`` that wait for the device's own news (staged or reverting)."""
        out: list[RolloutDevice] = []
        with self._read() as s:
            for i in range(0, len(device_ids), _CHUNK):
                query = select(t.rollout_devices).where(
                    t.rollout_devices.c.device_id.in_(list(device_ids[i : i + _CHUNK])),
                    t.rollout_devices.c.state.in_(["dispatched", "staged", "reverting"]),
                )
                out += [RolloutDevice.of(r) for r in s.execute(query).mappings()]
        return out

    def update_devices(
        self,
        rollout_id: str,
        changes: Mapping[str, Mapping[str, Any]],
        now: float,
        *,
        expect: Mapping[str, str] | None = None,
        lease: Lease | None = None,
    ) -> int:
        """Set columns of devices (device id -> values). ``expect``: device id -> the state
        it must still be in (a change that lost a race is skipped). Returns rows changed."""
        changed = 0
        with self._write(lease) as s:
            for device_id, values in changes.items():
                stmt = update(t.rollout_devices).where(
                    t.rollout_devices.c.rollout_id == rollout_id,
                    t.rollout_devices.c.device_id == device_id,
                )
                if expect is not None and device_id in expect:
                    stmt = stmt.where(t.rollout_devices.c.state == expect[device_id])
                row = dict(values)
                if "reason" in row:
                    row["reason"] = str(row["reason"])[: t.REASON_LENGTH]
                changed += rowcount(s.execute(stmt.values(**row, updated_at=now)))
        return changed

    def set_rollout(
        self,
        rollout_id: str,
        now: float,
        *,
        expect: str | None = None,
        lease: Lease | None = None,
        **values: Any,
    ) -> bool:
        """The leader's write of the rollout's state, phase, reason or revert flag; with
        ``expect``, only while the rollout is still in that state (an operator's move made
        meanwhile wins). Returns whether it was written."""
        if "reason" in values:
            values["reason"] = str(values["reason"])[: t.REASON_LENGTH]
        if values.get("state") in ENDED:
            values.setdefault("ended_at", now)
        stmt = update(t.rollouts).where(t.rollouts.c.id == rollout_id)
        if expect is not None:
            stmt = stmt.where(t.rollouts.c.state == expect)
        with self._write(lease) as s:
            return rowcount(s.execute(stmt.values(**values, updated_at=now))) > 0

    def transition(
        self, rollout_id: str, action: str, now: float, *, revert: bool = False, actor: str = ""
    ) -> RolloutRecord:
        """An operator's move (pause, resume, abort, approve), checked against the state
        the row holds in this transaction."""
        with self._write() as s:
            query = self._locked(select(t.rollouts).where(t.rollouts.c.id == rollout_id))
            row = s.execute(query).mappings().first()
            if row is None:
                raise NotFoundError("rollout", rollout_id)
            state = row["state"]
            if state not in MOVES[action]:
                raise ConflictError("rollout", rollout_id, f"cannot {action} a {state} rollout")
            who = f" by {actor}" if actor else ""
            values: dict[str, Any] = {"updated_at": now}
            if action == "pause":
                values |= {"state": "paused", "reason": f"paused{who}"}
            elif action == "resume":
                values |= {"state": "running", "reason": f"resumed{who}"}
            elif action == "abort":
                values |= {
                    "state": "aborted",
                    "reason": f"aborted{who}",
                    "revert": revert,
                    "ended_at": now,
                }
            else:
                phase = _to_approve(row)
                if phase is None:
                    raise ConflictError("rollout", rollout_id, "no phase waits for approval")
                approved = sorted({*row["approved"], phase})
                values |= {"approved": approved, "reason": f"phase {phase + 1} approved{who}"}
                if state == "waiting_approval":
                    values["state"] = "running"
            s.execute(update(t.rollouts).where(t.rollouts.c.id == rollout_id).values(**values))
            fresh = s.execute(select(t.rollouts).where(t.rollouts.c.id == rollout_id)).mappings()
            return RolloutRecord.of(fresh.one())


def _to_approve(row: Any) -> int | None:
    """The phase an approve is for: the one waiting, else (ahead of time, an external
    check say) the first gated phase from the current one not yet approved."""
    if row["state"] == "waiting_approval":
        return int(row["phase"])
    approved = {int(p) for p in row["approved"]}
    phases = row["plan"].get("phases", [])
    # From the current phase: a rollout paused while a phase waited still waits for it.
    for index in range(int(row["phase"]), len(phases)):
        if phases[index].get("approval") and index not in approved:
            return index
    return None
