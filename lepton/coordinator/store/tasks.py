"""Tasks in the database: submission, placement, acknowledgements, timeouts and reads."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, cast

from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError

from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.store.base import StoreBase, check_fence
from lepton.coordinator.store.connection import Engines
from lepton.coordinator.store.records import (
    AckOutcome,
    Assignment,
    AttemptRecord,
    Dispatch,
    Lease,
    NewTask,
    RetryPolicy,
    TaskRecord,
    from_row,
)
from lepton.coordinator.store.schema import AttemptRow, TaskRow
from lepton.coordinator.store.transitions import end_task, fail_attempt
from lepton.coordinator.tasks.states import IN_FLIGHT, TASK_STATES, TaskState
from lepton.protocol.messages import Task, TaskAck, new_id

_tasks = cast(Table, TaskRow.__table__)


def task_message(row: TaskRow) -> Task:
    """The wire message of a task's current attempt (stable across re-sends)."""
    assert row.dispatch_id is not None
    return Task(
        id=row.dispatch_id,
        task_id=row.id,
        kind=row.kind,
        params=row.params,
        expires_at=row.expires_at,
        attempt=row.attempt,
    )


class TaskRepo(StoreBase):
    """Task lifecycle writes and reads."""

    def __init__(self, engines: Engines, *, retry: RetryPolicy) -> None:
        super().__init__(engines)
        self.retry = retry
        # Per task kind: adds what only the receiving device may see to a task's message
        # as it is sent (see add_sealer); never stored.
        self._sealers: dict[str, Callable[[Task, str], Task]] = {}

    def add_sealer(self, kind: str, seal: Callable[[Task, str], Task]) -> None:
        """Have ``seal(message, device_id)`` finish every ``kind`` message sent to a device:
        it adds what only that device may see (a credential), computed at each send and
        never stored, so task views and results cannot show it."""
        self._sealers[kind] = seal

    def _dispatch(self, row: TaskRow, device_id: str) -> Dispatch:
        message = task_message(row)
        seal = self._sealers.get(row.kind)
        if seal is not None:
            message = seal(message, device_id)
        return Dispatch(task_id=row.id, device_id=device_id, attempt=row.attempt, message=message)

    # ------------------------------------------------------------------ submission

    def submit(self, task: NewTask) -> TaskRecord:
        """Store a new pending task; a taken id raises :class:`ConflictError`."""
        row = TaskRow(
            **asdict(task),
            state="pending",
            attempt=0,
            next_attempt_at=task.created_at,
            updated_at=task.created_at,
        )
        try:
            with self._write() as session:
                session.add(row)
                session.flush()
                return from_row(TaskRecord, row)
        except IntegrityError as exc:
            raise ConflictError("task", task.id, "id already exists") from exc

    def submit_many(self, tasks: Sequence[NewTask]) -> list[TaskRecord]:
        """Store new pending tasks in one transaction (all or none): a rollout step starting
        hundreds of devices takes the database's write lock once, not once per task."""
        rows = [
            TaskRow(
                **asdict(task),
                state="pending",
                attempt=0,
                next_attempt_at=task.created_at,
                updated_at=task.created_at,
            )
            for task in tasks
        ]
        if not rows:
            return []
        try:
            with self._write() as session:
                session.add_all(rows)
                session.flush()
                return [from_row(TaskRecord, row) for row in rows]
        except IntegrityError as exc:
            raise ConflictError("task", tasks[0].id, "an id already exists") from exc

    # ------------------------------------------------------------------ scheduling

    def due_pending(self, now: float, *, limit: int) -> list[TaskRecord]:
        """Pending tasks whose next attempt is due and that have not expired, oldest first."""
        stmt = (
            select(TaskRow)
            .where(
                TaskRow.state == "pending",
                TaskRow.next_attempt_at <= now,
                TaskRow.expires_at > now,
            )
            .order_by(TaskRow.next_attempt_at, TaskRow.created_at, TaskRow.id)
            .limit(limit)
        )
        with self._read() as session:
            return [from_row(TaskRecord, r) for r in session.scalars(stmt)]

    def expire_due(self, now: float, *, limit: int = 10_000) -> list[str]:
        """End pending tasks past their expiry; return their ids."""
        with self._write() as session:
            rows = session.scalars(
                self._locked(
                    select(TaskRow)
                    .where(TaskRow.state == "pending", TaskRow.expires_at <= now)
                    .order_by(TaskRow.id)
                    .limit(limit)
                )
            ).all()
            for row in rows:
                end_task(
                    session,
                    row,
                    "expired",
                    now,
                    outcome="expired",
                    error="expired before placement",
                )
            return [row.id for row in rows]

    def assign(
        self, assignments: Sequence[Assignment], now: float, *, lease: Lease | None = None
    ) -> list[Dispatch]:
        """Commit placements of pending tasks and return the messages to publish.

        A task that is no longer pending (taken by another path meanwhile) is skipped. With
        ``lease``, the transaction first checks that the lease is still held (fencing).
        """
        out: list[Dispatch] = []
        if not assignments:
            return out
        with self._write() as session:
            if lease is not None:
                check_fence(session, lease, now, lock=self.dialect == "postgresql")
            ids = [a.task_id for a in assignments]
            rows = {
                r.id: r
                for r in session.scalars(
                    self._locked(select(TaskRow).where(TaskRow.id.in_(ids)).order_by(TaskRow.id))
                )
            }
            for a in assignments:
                row = rows.get(a.task_id)
                if row is None or row.state != "pending":
                    continue
                row.state = "assigned"
                row.device_id = a.device_id
                row.attempt += 1
                row.assigned_at = now
                row.dispatch_id = new_id()
                row.dispatched_at = None
                row.sends = 0
                row.started_at = None
                row.explanation = a.explanation
                row.updated_at = now
                session.add(
                    AttemptRow(
                        task_id=row.id, attempt=row.attempt, device_id=a.device_id, assigned_at=now
                    )
                )
                out.append(self._dispatch(row, a.device_id))
        return out

    def mark_dispatched(self, sent: Sequence[tuple[str, int]], now: float) -> None:
        """Record that the broker accepted these (task id, attempt) messages."""
        if not sent:
            return
        stmt = (
            update(_tasks)
            .where(
                _tasks.c.id == bindparam("b_id"),
                _tasks.c.attempt == bindparam("b_attempt"),
                _tasks.c.dispatched_at.is_(None),
            )
            .values(dispatched_at=now, sends=_tasks.c.sends + 1)
        )
        with self._write() as session:
            session.execute(stmt, [{"b_id": t, "b_attempt": a} for t, a in sent])

    def undispatched(self, now: float, *, older_than_s: float, limit: int = 1000) -> list[Dispatch]:
        """Assigned tasks whose message is not confirmed sent: a publish failed, the leader
        died between commit and publish, or the device never acknowledged it. Re-sending is
        safe: the agent answers a second copy of the same attempt with a ``duplicate``
        refusal, which counts as an acknowledgement."""
        with self._read() as session:
            rows = session.scalars(
                select(TaskRow)
                .where(
                    TaskRow.state == "assigned",
                    TaskRow.dispatched_at.is_(None),
                    (TaskRow.assigned_at <= now - older_than_s) | (TaskRow.sends > 0),
                    # A task being cancelled is not sent again; its cancel is.
                    TaskRow.cancel_requested_at.is_(None),
                )
                .order_by(TaskRow.assigned_at)
                .limit(limit)
            ).all()
            return [self._dispatch(r, r.device_id or "") for r in rows]

    def note_unassigned(
        self,
        reasons: Mapping[str, str],
        explanations: Mapping[str, dict[str, Any]],
        now: float,
        *,
        retry_at: float | Mapping[str, float],
    ) -> None:
        """Keep tasks the plan could not place pending, with the reason, until ``retry_at``
        (one time, or one per task), so unplaceable tasks do not crowd the next batch."""
        if not reasons:
            return
        stmt = (
            update(_tasks)
            .where(_tasks.c.id == bindparam("b_id"), _tasks.c.state == "pending")
            .values(
                last_error=bindparam("b_reason"),
                explanation=bindparam("b_explanation"),
                next_attempt_at=bindparam("b_retry_at"),
                updated_at=now,
            )
        )
        params = [
            {
                "b_id": tid,
                "b_reason": reason,
                "b_explanation": explanations.get(tid),
                "b_retry_at": retry_at if isinstance(retry_at, float | int) else retry_at[tid],
            }
            for tid, reason in sorted(reasons.items())
        ]
        with self._write() as session:
            session.execute(stmt, params)

    def sweep_timeouts(
        self, now: float, *, ack_timeout_s: float, run_timeout_s: float, max_sends: int = 3
    ) -> list[tuple[str, str]]:
        """Handle attempts without an acknowledgement or a result in time.

        An unacknowledged attempt is first sent again (the same message: an agent that has it
        answers ``duplicate``, one that lost it takes it now), so a lost ack never makes a
        task run twice; after ``max_sends`` sends it fails. A running attempt past
        ``run_timeout_s`` fails. Returns (task id, new state) for every task changed.
        """
        out: list[tuple[str, str]] = []
        with self._write() as session:
            rows = session.scalars(
                self._locked(
                    select(TaskRow)
                    .where(
                        # A task being cancelled ends by its cancel's own deadline instead
                        # (CancelRepo.sweep_cancels).
                        TaskRow.cancel_requested_at.is_(None),
                        (
                            (TaskRow.state == "assigned")
                            & TaskRow.dispatched_at.is_not(None)
                            & (TaskRow.dispatched_at <= now - ack_timeout_s)
                        )
                        | (
                            (TaskRow.state == "running")
                            & (TaskRow.started_at <= now - run_timeout_s)
                        ),
                    )
                    .order_by(TaskRow.id)
                )
            ).all()
            for row in rows:
                if row.state == "assigned" and row.sends < max_sends:
                    row.dispatched_at = None  # picked up by undispatched() and sent again
                    out.append((row.id, "assigned"))
                    continue
                if row.state == "assigned":
                    reason = f"not acknowledged after {row.sends} sends ({ack_timeout_s:g}s each)"
                    outcome = "ack_timeout"
                else:
                    reason, outcome = f"no result within {run_timeout_s:g}s", "run_timeout"
                out.append(
                    (row.id, fail_attempt(session, row, reason, now, self.retry, outcome=outcome))
                )
        return out

    # ------------------------------------------------------------------ acknowledgements

    def apply_acks(self, device_id: str, acks: Sequence[TaskAck], now: float) -> list[AckOutcome]:
        """Apply task acknowledgements sent by ``device_id`` (the topic says who sent them)."""
        return self.apply_ack_batch([(device_id, ack, now) for ack in acks])

    def apply_ack_batch(self, items: Sequence[tuple[str, TaskAck, float]]) -> list[AckOutcome]:
        """Apply (device id, ack, received at) items of many devices in one transaction."""
        with self._write() as session:
            return [self._apply_ack(session, device_id, ack, now) for device_id, ack, now in items]

    def _apply_ack(  # noqa: PLR0911
        self, session: Any, device_id: str, ack: TaskAck, now: float
    ) -> AckOutcome:
        row = session.scalar(self._locked(select(TaskRow).where(TaskRow.id == ack.task_id)))
        if row is None:
            return AckOutcome(task_id=ack.task_id, outcome="unknown_task")
        current = row.device_id == device_id and row.state in IN_FLIGHT
        if not current:
            held = session.scalar(
                select(func.count())
                .select_from(AttemptRow)
                .where(AttemptRow.task_id == ack.task_id, AttemptRow.device_id == device_id)
            )
            return AckOutcome(
                task_id=ack.task_id, outcome="ignored" if held else "spoofed", task_state=row.state
            )
        if ack.accepted or ack.reason == "duplicate":
            if row.state != "assigned":
                return AckOutcome(task_id=row.id, outcome="ignored", task_state=row.state)
            row.state = "running"
            row.started_at = now
            row.updated_at = now
            if row.dispatched_at is None:
                row.dispatched_at = now
            session.execute(
                update(AttemptRow)
                .where(AttemptRow.task_id == row.id, AttemptRow.attempt == row.attempt)
                .values(acked_at=now)
            )
            return AckOutcome(task_id=row.id, outcome="running", task_state="running")
        reason = f"refused by {device_id}: {ack.reason or 'no reason given'}"
        if row.cancel_requested_at is not None:
            # The device's answer to the cancel: it will not run the task.
            fail_attempt(session, row, reason, now, self.retry, outcome="refused")
            return AckOutcome(task_id=row.id, outcome="cancelled", task_state="cancelled")
        if ack.reason == "expired":
            end_task(session, row, "expired", now, outcome="refused", error=reason)
            return AckOutcome(task_id=row.id, outcome="expired", task_state="expired")
        state = fail_attempt(session, row, reason, now, self.retry, outcome="refused")
        outcome = "retry" if state == "pending" else state
        return AckOutcome(task_id=row.id, outcome=outcome, task_state=state)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ reads

    def get_task(self, task_id: str) -> TaskRecord:
        with self._read() as session:
            row = session.get(TaskRow, task_id)
            if row is None:
                raise NotFoundError("task", task_id)
            return from_row(TaskRecord, row)

    def list_tasks(
        self,
        *,
        state: TaskState | None = None,
        device_id: str | None = None,
        kind: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRecord]:
        """Tasks, newest first."""
        stmt = (
            select(TaskRow)
            .order_by(TaskRow.created_at.desc(), TaskRow.id.desc())
            .limit(limit)
            .offset(offset)
        )
        if state is not None:
            stmt = stmt.where(TaskRow.state == state)
        if device_id is not None:
            stmt = stmt.where(TaskRow.device_id == device_id)
        if kind is not None:
            stmt = stmt.where(TaskRow.kind == kind)
        with self._read() as session:
            return [from_row(TaskRecord, r) for r in session.scalars(stmt)]

    def attempts(self, task_id: str) -> list[AttemptRecord]:
        with self._read() as session:
            rows = session.scalars(
                select(AttemptRow).where(AttemptRow.task_id == task_id).order_by(AttemptRow.attempt)
            )
            return [from_row(AttemptRecord, r) for r in rows]

    def count_tasks(self) -> dict[str, int]:
        """Tasks by state (every state present)."""
        with self._read() as session:
            rows = session.execute(
                select(TaskRow.state, func.count()).group_by(TaskRow.state)
            ).all()
        out: dict[str, int] = dict.fromkeys(TASK_STATES, 0)
        out.update({state: int(n) for state, n in rows})
        return out

    def inflight_by_device(self) -> dict[str, int]:
        """Assigned or running tasks per device: load the coordinator knows it has placed."""
        with self._read() as session:
            rows = session.execute(
                select(TaskRow.device_id, func.count())
                .where(TaskRow.state.in_(IN_FLIGHT))
                .group_by(TaskRow.device_id)
            ).all()
        return {d: int(n) for d, n in rows if d is not None}
