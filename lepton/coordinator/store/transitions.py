"""Task state transitions shared by the parts of the store, inside a caller's transaction.

The lifecycle::

    pending --assign--> assigned --ack accepted--> running --result--> succeeded | failed | expired
       ^                   |                          |
       +---- retry (backoff, attempt < max) ----------+   (refusal, failure, device offline,
                                                          ack or run timeout)
    pending --cancel--> cancelled
    assigned | running --cancel--> (cancel requested) --device answers, or gives up--> cancelled

A pending task past ``expires_at`` becomes ``expired``; a failed attempt of a task out of
attempts (or past its expiry) ends the task. A task whose cancel was requested is never
tried again: whatever ends its attempt (a result of any status, a refusal, the device going
offline, a timeout) ends it ``cancelled``.
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from lepton.coordinator.store.records import CancelOutcomeName, RetryPolicy
from lepton.coordinator.store.schema import AttemptRow, TaskRow
from lepton.coordinator.tasks.states import DEVICE_OFFLINE, IN_FLIGHT, TERMINAL, TaskState


def finish_attempt(
    session: Session, task_id: str, attempt: int, now: float, *, outcome: str, error: str | None
) -> None:
    """Close the attempt record (once: a later outcome does not overwrite the first)."""
    session.execute(
        update(AttemptRow)
        .where(
            AttemptRow.task_id == task_id,
            AttemptRow.attempt == attempt,
            AttemptRow.finished_at.is_(None),
        )
        .values(finished_at=now, outcome=outcome, error=error)
    )


def _clear_assignment(row: TaskRow) -> None:
    row.device_id = None
    row.assigned_at = None
    row.dispatch_id = None
    row.dispatched_at = None
    row.started_at = None


def fail_attempt(
    session: Session,
    row: TaskRow,
    reason: str,
    now: float,
    retry: RetryPolicy,
    *,
    outcome: str,
    backoff: bool = True,
) -> TaskState:
    """The current attempt did not produce a result: retry it or end the task.

    Retries wait ``retry.delay(attempt)`` unless ``backoff`` is False (a device that went
    away is not the task's fault, so its tasks are placed again at once). Attempts count
    against ``max_attempts`` only once they reached their device (see :func:`used_attempts`).
    """
    finish_attempt(session, row.id, row.attempt, now, outcome=outcome, error=reason)
    row.last_error = reason
    row.updated_at = now
    if row.cancel_requested_at is not None:
        end_cancelled(session, row, now, outcome=outcome)
    elif now >= row.expires_at:
        row.state = "expired"
        row.finished_at = now
        row.device_id = None
    elif row.attempt >= row.max_attempts and used_attempts(session, row) >= row.max_attempts:
        row.state = "failed"
        row.finished_at = now
    else:
        row.state = "pending"
        _clear_assignment(row)
        row.next_attempt_at = now + (retry.delay(row.attempt) if backoff else 0.0)
    return row.state  # type: ignore[return-value]


def used_attempts(session: Session, row: TaskRow) -> int:
    """Attempts that count against ``max_attempts``: all but those taken back from a device
    that went offline before acknowledging them. Such an attempt never reached the device (or
    the broker: the coordinator's own link may have been down), so it tried nothing; the
    task's expiry still bounds how often that can happen."""
    free = session.scalar(
        select(func.count())
        .select_from(AttemptRow)
        .where(
            AttemptRow.task_id == row.id,
            AttemptRow.outcome == DEVICE_OFFLINE,
            AttemptRow.acked_at.is_(None),
        )
    )
    return row.attempt - int(free or 0)


def end_task(
    session: Session, row: TaskRow, state: TaskState, now: float, *, outcome: str, error: str | None
) -> None:
    """Move a task to a terminal state and close its current attempt."""
    if row.attempt:
        finish_attempt(session, row.id, row.attempt, now, outcome=outcome, error=error)
    row.state = state
    row.finished_at = now
    row.updated_at = now
    if error is not None:
        row.last_error = error


def requeue_device(
    session: Session, device_id: str, reason: str, now: float, retry: RetryPolicy, *, lock: bool
) -> list[str]:
    """Take every assigned or running task back from a device that went offline."""
    stmt = select(TaskRow).where(TaskRow.device_id == device_id, TaskRow.state.in_(IN_FLIGHT))
    if lock:
        stmt = stmt.with_for_update()
    rows = session.scalars(stmt.order_by(TaskRow.id)).all()
    for row in rows:
        fail_attempt(session, row, reason, now, retry, outcome=DEVICE_OFFLINE, backoff=False)
    return [row.id for row in rows]


def end_cancelled(session: Session, row: TaskRow, now: float, *, outcome: str) -> None:
    """End a task ``cancelled`` (its cancel was requested; the reason is kept with it)."""
    end_task(
        session, row, "cancelled", now, outcome=outcome, error=f"cancelled: {row.cancel_reason}"
    )


def request_cancel(session: Session, row: TaskRow, reason: str, now: float) -> CancelOutcomeName:
    """Cancel a task (idempotent): a pending one ends at once; an assigned or running one is
    marked so its device is told (:class:`~lepton.coordinator.store.records.CancelSend`), and ends
    when the device answers. The first request's reason is the one kept."""
    if row.state == "cancelled":
        return "cancelled"
    if row.state in TERMINAL:
        return "finished"
    if row.cancel_requested_at is None:
        row.cancel_requested_at = now
        row.cancel_reason = reason
        row.cancel_sent_at = None
        row.cancel_sends = 0
        row.updated_at = now
    if row.state == "pending":
        end_cancelled(session, row, now, outcome="cancelled")
        return "cancelled"
    return "requested"
