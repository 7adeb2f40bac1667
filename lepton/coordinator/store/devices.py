"""The fleet registry in the database: devices, their capacity history and liveness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, and_, bindparam, case, delete, func, insert, null, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.store.base import StoreBase, greatest, rowcount
from lepton.coordinator.store.connection import Engines
from lepton.coordinator.store.records import (
    CapacityPoint,
    CapacitySample,
    DeviceRecord,
    DeviceStateName,
    RetryPolicy,
    from_row,
)
from lepton.coordinator.store.schema import CapacityRow, DeviceRow
from lepton.coordinator.store.transitions import requeue_device
from lepton.protocol.messages import State


class StateUpdate(NamedTuple):
    """A birth or will as received: the topic's device id and the message."""

    device_id: str
    fleet: str
    message: State
    received_at: float
    retained: bool = False


_devices = cast(Table, DeviceRow.__table__)
_history = cast(Table, CapacityRow.__table__)


class DeviceRepo(StoreBase):
    """Registry writes (batched capacity, birth and will, deadline sweep) and reads.
    ``retry``: the backoff of tasks a device going offline sends back to pending;
    ``history_limit``: capacity reports kept per device."""

    def __init__(self, engines: Engines, *, retry: RetryPolicy, history_limit: int) -> None:
        super().__init__(engines)
        self.retry = retry
        self.history_limit = history_limit

    # ------------------------------------------------------------------ writes

    def record_capacity(self, samples: Sequence[CapacitySample]) -> int:
        """Write a batch of capacity reports in one transaction; return devices touched.

        A device's row takes the newest report (by the report's own time, so batches from
        several replicas may land in any order); every report goes into the history, trimmed
        to the last ``capacity_history`` per device. A report proves the device is alive: an
        offline device comes back online unless it went offline after the report arrived.
        """
        if not samples:
            return 0
        latest: dict[str, CapacitySample] = {}
        for s in samples:
            cur = latest.get(s.device_id)
            if cur is None or s.report_ts >= cur.report_ts:
                latest[s.device_id] = s
        c = _devices.c
        ins = self._insert(_devices)
        ex = ins.excluded
        newer = ex.report_ts >= c.report_ts
        revive = and_(c.state == "offline", c.state_at <= ex.last_seen)

        def pick(col: str) -> ColumnElement[Any]:
            return _case(newer, ex[col], c[col])

        stmt = ins.on_conflict_do_update(
            index_elements=[c.id],
            set_={
                "last_seen": greatest(c.last_seen, ex.last_seen),
                "state": _case(revive, "online", c.state),
                "state_at": _case(revive, ex.last_seen, c.state_at),
                "offline_reason": _case(revive, null(), c.offline_reason),
                "report": pick("report"),
                "report_ts": pick("report_ts"),
                "report_interval_s": pick("report_interval_s"),
                "device_class": _case(
                    newer, func.coalesce(ex.device_class, c.device_class), c.device_class
                ),
                "device_model": pick("device_model"),
                "runtimes": pick("runtimes"),
                "accelerators": pick("accelerators"),
                "tags": pick("tags"),
                "reports": c.reports + 1,
            },
        )
        rows = [
            {
                "id": s.device_id,
                "fleet": s.fleet,
                "state": "online",
                "state_at": s.received_at,
                "offline_reason": None,
                "device_class": s.device_class,
                "device_model": s.device_model,
                "agent_version": "",
                "runtimes": s.runtimes,
                "accelerators": s.accelerators,
                "tags": s.tags,
                "groups": [],
                "first_seen": s.received_at,
                "last_seen": s.received_at,
                "report": s.report,
                "report_ts": s.report_ts,
                "report_interval_s": s.interval_s,
                "reports": 1,
            }
            for s in latest.values()
        ]
        history = [
            {
                "device_id": s.device_id,
                "ts": s.report_ts,
                "received_at": s.received_at,
                "report": s.report,
            }
            for s in samples
        ]
        keep = (
            select(_history.c.id)
            .where(_history.c.device_id == bindparam("d"))
            .order_by(_history.c.id.desc())
            .limit(1)
            .offset(self.history_limit)
            .scalar_subquery()
        )
        trim = delete(_history).where(_history.c.device_id == bindparam("d"), _history.c.id <= keep)
        with self._write() as session:
            session.execute(stmt, sorted(rows, key=lambda r: str(r["id"])))
            session.execute(insert(_history), history)
            session.execute(trim, [{"d": d} for d in sorted(latest)])
        return len(latest)

    def apply_state(
        self, device_id: str, fleet: str, msg: State, received_at: float, *, retained: bool = False
    ) -> list[str]:
        """Apply a birth (``online``) or Last Will (``offline``) message.

        Going offline takes back the device's assigned and running tasks; their ids are
        returned. A will received before the device's current state (``state_at``) is stale
        and ignored. A retained message (delivered on subscribe, possibly old) changes the state
        but does not count as a sign of life.
        """
        return self.apply_states([StateUpdate(device_id, fleet, msg, received_at, retained)])[0]

    def apply_states(self, updates: Sequence[StateUpdate]) -> list[list[str]]:
        """Apply births and wills in arrival order, in one transaction (after a reconnect
        the broker re-delivers every retained state at once); requeued task ids per update."""
        with self._write() as session:
            return [self._apply_state(session, u) for u in updates]

    def _apply_state(self, session: Session, u: StateUpdate) -> list[str]:
        device_id, fleet, msg, received_at, retained = u
        c = _devices.c
        online = msg.state == "online"
        ins = self._insert(_devices).values(
            id=device_id,
            fleet=fleet,
            state=msg.state,
            state_at=received_at,
            offline_reason=None if online else (msg.reason or "last will"),
            device_class=msg.device_class,
            device_model="",
            agent_version=msg.agent_version,
            runtimes=list(msg.runtimes),
            accelerators=[],
            tags=[],
            groups=[],
            first_seen=received_at,
            last_seen=received_at,
            report=None,
            report_ts=0.0,
            report_interval_s=None,
            reports=0,
        )
        ex = ins.excluded
        values: dict[str, Any] = {
            "state": ex.state,
            "state_at": ex.state_at,
            "offline_reason": ex.offline_reason,
        }
        if online:
            values["agent_version"] = ex.agent_version
            values["device_class"] = func.coalesce(ex.device_class, c.device_class)
            if msg.runtimes:
                values["runtimes"] = ex.runtimes
            if not retained:
                values["last_seen"] = greatest(c.last_seen, ex.last_seen)
        if online:
            session.execute(ins.on_conflict_do_update(index_elements=[c.id], set_=values))
            return []
        # A will received before the state it would replace is stale: replicas sharing the
        # subscription (or a broker redelivering) may apply a will after the birth of the
        # device's next connection, and the device is connected then; it changes nothing.
        newest = c.state_at <= ex.state_at
        upsert = ins.on_conflict_do_update(index_elements=[c.id], set_=values, where=newest)
        if session.execute(upsert.returning(c.id)).first() is None:
            return []
        reason = f"device offline ({msg.reason or 'last will'})"
        return requeue_device(
            session, device_id, reason, received_at, self.retry, lock=self.dialect == "postgresql"
        )

    def _deadline(
        self, missed: float, default_interval_s: float, seen_floor: float
    ) -> ColumnElement[float]:
        interval = func.coalesce(DeviceRow.report_interval_s, default_interval_s)
        return greatest(_devices.c.last_seen, seen_floor) + missed * interval

    def mark_stale_offline(
        self,
        now: float,
        *,
        missed: float,
        default_interval_s: float,
        seen_floor: float = 0.0,
        limit: int = 1000,
    ) -> dict[str, list[str]]:
        """Mark devices that missed ``missed`` report intervals offline and take back their
        tasks; return device id -> requeued task ids.

        A device counts as seen at ``seen_floor`` at the latest: the caller's link to the
        broker came back then, and no report could reach it before.
        """
        deadline = self._deadline(missed, default_interval_s, seen_floor)
        out: dict[str, list[str]] = {}
        with self._write() as session:
            ids = session.scalars(
                select(DeviceRow.id)
                .where(DeviceRow.state == "online", deadline < now)
                .order_by(DeviceRow.id)
                .limit(limit)
            ).all()
            for device_id in ids:
                # Compare-and-set: a report that landed since the select keeps it online.
                changed = rowcount(
                    session.execute(
                        update(DeviceRow)
                        .where(
                            DeviceRow.id == device_id, DeviceRow.state == "online", deadline < now
                        )
                        .values(state="offline", state_at=now, offline_reason="missed reports")
                    )
                )
                if changed:
                    out[device_id] = requeue_device(
                        session,
                        device_id,
                        "device offline (missed reports)",
                        now,
                        self.retry,
                        lock=self.dialect == "postgresql",
                    )
        return out

    def mark_revoked(self, device_id: str, now: float) -> list[str]:
        """A revoked device: offline (reason ``revoked``) and its assigned and running tasks
        taken back at once, without backoff; returns their ids. A device the registry has
        never seen has no tasks: nothing changes."""
        with self._write() as session:
            session.execute(
                update(DeviceRow)
                .where(DeviceRow.id == device_id)
                .values(state="offline", state_at=now, offline_reason="revoked")
            )
            return requeue_device(
                session,
                device_id,
                "device offline (revoked)",
                now,
                self.retry,
                lock=self.dialect == "postgresql",
            )

    def next_deadline(
        self, *, missed: float, default_interval_s: float, seen_floor: float = 0.0
    ) -> float | None:
        """The earliest time an online device will miss its deadline (None: none online)."""
        with self._read() as session:
            value = session.scalar(
                select(func.min(self._deadline(missed, default_interval_s, seen_floor))).where(
                    DeviceRow.state == "online"
                )
            )
        return float(value) if value is not None else None

    def set_groups(self, device_id: str, groups: Sequence[str]) -> DeviceRecord:
        """Replace the operator-assigned groups of a device."""
        with self._write() as session:
            row = session.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError("device", device_id)
            row.groups = sorted(set(groups))
            return from_row(DeviceRecord, row)

    # ------------------------------------------------------------------ reads

    def get_device(self, device_id: str) -> DeviceRecord:
        with self._read() as session:
            row = session.get(DeviceRow, device_id)
            if row is None:
                raise NotFoundError("device", device_id)
            return from_row(DeviceRecord, row)

    def device_exists(self, device_id: str) -> bool:
        with self._read() as session:
            return session.get(DeviceRow, device_id) is not None

    def list_devices(
        self,
        *,
        state: DeviceStateName | None = None,
        fleet: str | None = None,
        limit: int = 1000,
        offset: int = 0,
    ) -> list[DeviceRecord]:
        stmt = select(DeviceRow).order_by(DeviceRow.id).limit(limit).offset(offset)
        if state is not None:
            stmt = stmt.where(DeviceRow.state == state)
        if fleet is not None:
            stmt = stmt.where(DeviceRow.fleet == fleet)
        with self._read() as session:
            return [from_row(DeviceRecord, r) for r in session.scalars(stmt)]

    def count_devices(self) -> dict[str, int]:
        """Devices by state (both keys always present)."""
        with self._read() as session:
            rows = session.execute(
                select(DeviceRow.state, func.count()).group_by(DeviceRow.state)
            ).all()
        out = {"online": 0, "offline": 0}
        out.update({state: int(n) for state, n in rows})
        return out

    def capacity_history(self, device_id: str, *, limit: int = 100) -> list[CapacityPoint]:
        """The device's most recent capacity reports, newest first."""
        with self._read() as session:
            rows = session.execute(
                select(CapacityRow.ts, CapacityRow.received_at, CapacityRow.report)
                .where(CapacityRow.device_id == device_id)
                .order_by(CapacityRow.id.desc())
                .limit(limit)
            ).all()
        return [CapacityPoint(ts=ts, received_at=rec, report=rep) for ts, rec, rep in rows]


def _case(cond: ColumnElement[bool], then: Any, otherwise: Any) -> ColumnElement[Any]:
    return case((cond, then), else_=otherwise)
