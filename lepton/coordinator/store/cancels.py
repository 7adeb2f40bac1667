"""Cancelling tasks: at once while pending, through the device while assigned or running.

A cancel is recorded on the task (``cancel_requested_at``, its reason) in the transaction
that asks for it. The scheduling leader sends a :class:`~lepton.protocol.messages.TaskCancel` to
the device of each cancel-requested task (:meth:`CancelRepo.cancels_due`), again every
``resend_after_s`` until the device answers, like task messages are sent; the answer is any
result of the attempt it held, or a refusal of the task. A device that does not answer
after ``max_sends`` sends is given up on (:meth:`CancelRepo.sweep_cancels`): the task ends
``cancelled`` all the same, and a result it sends later is kept as stale, never applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from sqlalchemy import Table, bindparam, select, update

from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.store.base import StoreBase
from lepton.coordinator.store.records import CancelOutcome, CancelSend
from lepton.coordinator.store.schema import TaskRow
from lepton.coordinator.store.transitions import end_cancelled, request_cancel
from lepton.coordinator.tasks.states import IN_FLIGHT

_tasks = cast(Table, TaskRow.__table__)


class CancelRepo(StoreBase):
    """Cancel requests and the bookkeeping of sending them."""

    def cancel_task(self, task_id: str, reason: str, now: float) -> CancelOutcome:
        """Cancel one task (idempotent); an unknown id raises :class:`NotFoundError`."""
        (out,) = self.cancel_tasks([task_id], reason, now)
        if out.outcome == "unknown":
            raise NotFoundError("task", task_id)
        return out

    def cancel_tasks(self, task_ids: Sequence[str], reason: str, now: float) -> list[CancelOutcome]:
        """Cancel these tasks in one transaction; one outcome per id, in order."""
        if not task_ids:
            return []
        with self._write() as session:
            rows = {
                r.id: r
                for r in session.scalars(
                    self._locked(
                        select(TaskRow).where(TaskRow.id.in_(set(task_ids))).order_by(TaskRow.id)
                    )
                )
            }
            out: list[CancelOutcome] = []
            for task_id in task_ids:
                row = rows.get(task_id)
                if row is None:
                    out.append(CancelOutcome(task_id=task_id, outcome="unknown"))
                    continue
                before = (row.state, row.cancel_requested_at)
                outcome = request_cancel(session, row, reason, now)
                out.append(
                    CancelOutcome(
                        task_id=task_id,
                        outcome=outcome,
                        state=row.state,  # type: ignore[arg-type]
                        device_id=row.device_id,
                        changed=before != (row.state, row.cancel_requested_at),
                    )
                )
            return out

    def cancels_due(
        self, now: float, *, resend_after_s: float, max_sends: int = 3, limit: int = 1000
    ) -> list[CancelSend]:
        """Cancels to send now: never sent, or sent ``resend_after_s`` ago without an answer
        (fewer than ``max_sends`` times)."""
        with self._read() as session:
            rows = session.scalars(
                select(TaskRow)
                .where(
                    TaskRow.state.in_(IN_FLIGHT),
                    TaskRow.cancel_requested_at.is_not(None),
                    TaskRow.device_id.is_not(None),
                    TaskRow.cancel_sent_at.is_(None)
                    | (
                        (TaskRow.cancel_sent_at <= now - resend_after_s)
                        & (TaskRow.cancel_sends < max_sends)
                    ),
                )
                .order_by(TaskRow.cancel_requested_at, TaskRow.id)
                .limit(limit)
            ).all()
            return [
                CancelSend(task_id=r.id, device_id=r.device_id or "", reason=r.cancel_reason or "")
                for r in rows
            ]

    def mark_cancels_sent(self, task_ids: Sequence[str], now: float) -> None:
        """Record that the broker accepted the cancels of these tasks."""
        if not task_ids:
            return
        stmt = (
            update(_tasks)
            .where(_tasks.c.id == bindparam("b_id"), _tasks.c.cancel_requested_at.is_not(None))
            .values(cancel_sent_at=now, cancel_sends=_tasks.c.cancel_sends + 1)
        )
        with self._write() as session:
            session.execute(stmt, [{"b_id": t} for t in task_ids])

    def sweep_cancels(self, now: float, *, resend_after_s: float, max_sends: int = 3) -> list[str]:
        """End ``cancelled`` the tasks whose device answered none of ``max_sends`` cancels;
        return their ids."""
        with self._write() as session:
            rows = session.scalars(
                self._locked(
                    select(TaskRow)
                    .where(
                        TaskRow.state.in_(IN_FLIGHT),
                        TaskRow.cancel_requested_at.is_not(None),
                        TaskRow.cancel_sends >= max_sends,
                        TaskRow.cancel_sent_at <= now - resend_after_s,
                    )
                    .order_by(TaskRow.id)
                )
            ).all()
            for row in rows:
                end_cancelled(session, row, now, outcome="cancel_unanswered")
            return [row.id for row in rows]
