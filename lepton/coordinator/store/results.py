"""Applying results: once per result id, only from the device that held the attempt.

Checks, in order, for each result that ``device_id`` (the topic's device) sent:

1. the result id is already stored: ``replayed`` (acknowledged again, applied once), or
   ``spoofed`` when another device sent the stored one;
2. the device is not in the registry: ``unknown_device``;
3. the task does not exist: ``unknown_task``;
4. the device never held that attempt of the task: ``spoofed``;
5. otherwise the result is stored and, if it still matters, moves the task: the first
   success of any legitimate attempt wins; a failure of the current attempt retries or ends
   the task; anything else is ``stale`` (kept, acknowledged, not applied);
6. a task whose cancel was requested applies no result, a success included: a result of
   the attempt its device held is the device's answer to the cancel (``cancelled``: kept,
   acknowledged, the task ends ``cancelled``); a result of a cancelled task is ``stale``.

Rejected results are not acknowledged, so a misdirected agent keeps them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, select
from sqlalchemy.orm import Session

from lepton.coordinator.store.base import StoreBase
from lepton.coordinator.store.connection import Engines
from lepton.coordinator.store.records import (
    ResultOutcome,
    ResultOutcomeName,
    ResultRecord,
    RetryPolicy,
    from_row,
)
from lepton.coordinator.store.schema import (
    AttemptRow,
    DeviceRow,
    ObservationRow,
    ResultRow,
    TaskRow,
)
from lepton.coordinator.store.transitions import (
    end_cancelled,
    end_task,
    fail_attempt,
    finish_attempt,
)
from lepton.coordinator.tasks.states import IN_FLIGHT, TERMINAL
from lepton.protocol.messages import FINAL_FAILURES, Result

_results = cast(Table, ResultRow.__table__)


class ResultRepo(StoreBase):
    def __init__(self, engines: Engines, *, retry: RetryPolicy) -> None:
        super().__init__(engines)
        self.retry = retry

    def apply_results(
        self, device_id: str, results: Sequence[Result], now: float
    ) -> list[ResultOutcome]:
        """Apply results from one device in one transaction (see :meth:`apply_result_batch`)."""
        return self.apply_result_batch([(device_id, r, now) for r in results])

    def apply_result_batch(self, items: Sequence[tuple[str, Result, float]]) -> list[ResultOutcome]:
        """Apply (device id, result, received at) items of many devices in one transaction.

        The caller acknowledges the ``ack`` ones only after this returns (committed).
        """
        with self._write() as session:
            known: dict[str, bool] = {}
            out: list[ResultOutcome] = []
            for device_id, r, now in items:
                if device_id not in known:
                    known[device_id] = session.get(DeviceRow, device_id) is not None
                out.append(self._apply(session, device_id, known[device_id], r, now))
            return out

    def _apply(  # noqa: PLR0911
        self, session: Session, device_id: str, known: bool, r: Result, now: float
    ) -> ResultOutcome:
        kind: str | None = None  # known once the task is

        def out(outcome: ResultOutcomeName, state: str | None = None) -> ResultOutcome:
            return ResultOutcome(
                result_id=r.id,
                task_id=r.task_id,
                device_id=device_id,
                outcome=outcome,
                task_state=state,
                task_kind=kind,
            )

        stored = session.get(ResultRow, r.id)
        if stored is not None:
            return out("replayed" if stored.device_id == device_id else "spoofed")
        if not known:
            return out("unknown_device")
        task = session.scalar(self._locked(select(TaskRow).where(TaskRow.id == r.task_id)))
        if task is None:
            return out("unknown_task")
        kind = task.kind
        held = session.get(AttemptRow, (r.task_id, r.attempt))
        if held is None or held.device_id != device_id:
            return out("spoofed", task.state)
        current = r.attempt == task.attempt and task.state in IN_FLIGHT
        cancelling = task.cancel_requested_at is not None
        apply = (
            not cancelling and task.state not in TERMINAL and (r.status == "succeeded" or current)
        )
        # RETURNING, not rowcount: drivers report -1 rows for INSERT ... ON CONFLICT.
        inserted = session.scalar(
            self._insert(_results)
            .values(
                id=r.id,
                task_id=r.task_id,
                device_id=device_id,
                attempt=r.attempt,
                status=r.status,
                output=r.output,
                error=r.error,
                started_at=r.started_at,
                finished_at=r.finished_at,
                received_at=now,
                applied=apply,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(_results.c.id)
        )
        if inserted is None:  # a replica stored it between our read and our insert
            return out("replayed", task.state)
        if cancelling and current:
            finish_attempt(session, task.id, r.attempt, now, outcome=r.status, error=r.error)
            end_cancelled(session, task, now, outcome=r.status)
            task.result_id = r.id
            return out("cancelled", task.state)
        if not apply:
            return out("stale", task.state)
        if r.status == "succeeded":
            if r.attempt != task.attempt:
                finish_attempt(
                    session, task.id, task.attempt, now, outcome="superseded", error=None
                )
            finish_attempt(session, task.id, r.attempt, now, outcome="succeeded", error=None)
            task.state = "succeeded"
            task.finished_at = now
            task.updated_at = now
            task.device_id = device_id
            task.output = r.output
            task.result_id = r.id
            self._observe(session, task, device_id, r, now)
        elif r.status == "expired":
            end_task(
                session,
                task,
                "expired",
                now,
                outcome="expired",
                error=r.error or "expired on device",
            )
            task.result_id = r.id
        elif r.reason in FINAL_FAILURES:
            # The task took its agent down each time it ran there: sending it to another
            # device would take that one down too.
            end_task(session, task, "failed", now, outcome=r.reason, error=r.error or r.reason)
            task.last_error = r.error or r.reason
            task.result_id = r.id
        else:
            reason = r.error or f"{r.status} on {device_id}"
            fail_attempt(session, task, reason, now, self.retry, outcome=r.status)
            task.result_id = r.id
        return out("applied", task.state)

    @staticmethod
    def _observe(session: Session, task: TaskRow, device_id: str, r: Result, now: float) -> None:
        if r.started_at is None or r.finished_at is None or task.demand_gops <= 0:
            return
        seconds = r.finished_at - r.started_at
        if seconds < 0:
            return
        session.add(
            ObservationRow(
                device_id=device_id,
                model_class=task.model_class,
                precision=task.precision,
                demand_gops=task.demand_gops,
                seconds=seconds,
                created_at=now,
            )
        )

    def results_for(self, task_id: str) -> list[ResultRecord]:
        with self._read() as session:
            rows = session.scalars(
                select(ResultRow)
                .where(ResultRow.task_id == task_id)
                .order_by(ResultRow.received_at)
            )
            return [from_row(ResultRecord, r) for r in rows]
