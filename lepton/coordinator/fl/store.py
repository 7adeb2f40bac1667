"""Federated jobs, rounds and updates in SQL: every method is one transaction.

Plain values in and out (:mod:`lepton.coordinator.fl.records`); SQLAlchemy Core over the
coordinator store's engine, on the tables of :mod:`lepton.coordinator.fl.tables`, with the
store's session and dialect helpers (:class:`~lepton.coordinator.store.base.StoreBase`). Methods
are synchronous and are called from worker threads. Leader-only writes take the scheduling
lease and check it in their own transaction (fencing), like the store's own leader writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from sqlalchemy import delete, insert, select, update

from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.fl import tables as t
from lepton.coordinator.fl.records import (
    JobRecord,
    RecordOutcome,
    RoundRecord,
    UpdateRecord,
)
from lepton.coordinator.store import Lease
from lepton.coordinator.store.base import StoreBase, rowcount


class FLStore(StoreBase):
    """Jobs, rounds and updates (see module doc). ``FLStore(store.engine)``."""

    # ------------------------------------------------------------------ jobs

    def create_job(self, job_id: str, name: str, spec: Mapping[str, Any], now: float) -> JobRecord:
        """Store a new pending job; a taken id is a :class:`ConflictError`."""
        with self._write() as s:
            exists = s.execute(select(t.jobs.c.id).where(t.jobs.c.id == job_id)).first()
            if exists is not None:
                raise ConflictError("fl job", job_id, "id already exists")
            s.execute(
                insert(t.jobs).values(
                    id=job_id,
                    name=name,
                    spec=dict(spec),
                    state="pending",
                    round=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            row = s.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one()
            return JobRecord.of(row)

    def get_job(self, job_id: str) -> JobRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().first()
        if row is None:
            raise NotFoundError("fl job", job_id)
        return JobRecord.of(row)

    def list_jobs(self, *, states: Sequence[str] | None = None) -> list[JobRecord]:
        query = select(t.jobs).order_by(t.jobs.c.created_at, t.jobs.c.id)
        if states is not None:
            query = query.where(t.jobs.c.state.in_(list(states)))
        with self.engine.connect() as conn:
            return [JobRecord.of(r) for r in conn.execute(query).mappings()]

    def update_job(self, job_id: str, *, lease: Lease | None = None, **values: Any) -> None:
        """Set columns of a job (leader writes pass ``lease``)."""
        values["updated_at"] = time.time()
        with self._write(lease) as s:
            s.execute(update(t.jobs).where(t.jobs.c.id == job_id).values(**values))

    def request_stop(self, job_id: str) -> JobRecord:
        """Ask a job to stop: an active job becomes ``stopping`` (the engine finishes it)."""
        with self._write() as s:
            row = (
                s.execute(self._locked(select(t.jobs).where(t.jobs.c.id == job_id)))
                .mappings()
                .first()
            )
            if row is None:
                raise NotFoundError("fl job", job_id)
            if row["state"] in ("pending", "running"):
                s.execute(
                    update(t.jobs)
                    .where(t.jobs.c.id == job_id)
                    .values(state="stopping", updated_at=time.time())
                )
            row = s.execute(select(t.jobs).where(t.jobs.c.id == job_id)).mappings().one()
            return JobRecord.of(row)

    # ------------------------------------------------------------------ rounds

    def get_round(self, job_id: str, round_no: int) -> RoundRecord | None:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    select(t.rounds).where(
                        t.rounds.c.job_id == job_id, t.rounds.c.round == round_no
                    )
                )
                .mappings()
                .first()
            )
        return RoundRecord.of(row) if row is not None else None

    def list_rounds(self, job_id: str) -> list[RoundRecord]:
        query = select(t.rounds).where(t.rounds.c.job_id == job_id).order_by(t.rounds.c.round)
        with self.engine.connect() as conn:
            return [RoundRecord.of(r) for r in conn.execute(query).mappings()]

    def open_round(
        self,
        job_id: str,
        round_no: int,
        *,
        selected: Sequence[str],
        tokens: Mapping[str, str],
        tasks: Mapping[str, str],
        selection: Mapping[str, Any],
        base_digest: str,
        started_at: float,
        deadline: float,
        reported_sizes: Mapping[str, int] | None = None,
        lease: Lease | None = None,
    ) -> RoundRecord:
        """Record a new open round (its selection, tokens, task ids, the data sizes its
        devices reported, and its deadline)."""
        with self._write(lease) as s:
            s.execute(
                insert(t.rounds).values(
                    job_id=job_id,
                    round=round_no,
                    state="open",
                    attempt=1,
                    selected=list(selected),
                    tokens=dict(tokens),
                    tasks=dict(tasks),
                    selection=dict(selection),
                    base_digest=base_digest,
                    started_at=started_at,
                    deadline=deadline,
                    rejects={},
                    reported_sizes=dict(reported_sizes or {}),
                )
            )
            s.execute(
                update(t.jobs)
                .where(t.jobs.c.id == job_id)
                .values(round=round_no, updated_at=time.time())
            )
        got = self.get_round(job_id, round_no)
        assert got is not None
        return got

    def extend_round(
        self,
        job_id: str,
        round_no: int,
        *,
        selected: Sequence[str],
        tokens: Mapping[str, str],
        tasks: Mapping[str, str],
        deadline: float,
        reported_sizes: Mapping[str, int] | None = None,
        lease: Lease | None = None,
    ) -> RoundRecord:
        """Add devices to an open round and move its deadline (a round short of results).
        A device already in the round keeps the data size recorded when it was selected."""
        with self._write(lease) as s:
            row = (
                s.execute(
                    self._locked(
                        select(t.rounds).where(
                            t.rounds.c.job_id == job_id, t.rounds.c.round == round_no
                        )
                    )
                )
                .mappings()
                .one()
            )
            s.execute(
                update(t.rounds)
                .where(t.rounds.c.job_id == job_id, t.rounds.c.round == round_no)
                .values(
                    attempt=row["attempt"] + 1,
                    selected=[*row["selected"], *[d for d in selected if d not in row["tokens"]]],
                    tokens={**row["tokens"], **tokens},
                    tasks={**row["tasks"], **tasks},
                    reported_sizes={
                        **{
                            d: n
                            for d, n in (reported_sizes or {}).items()
                            if d not in row["tokens"]
                        },
                        **(row["reported_sizes"] or {}),
                    },
                    deadline=deadline,
                )
            )
        got = self.get_round(job_id, round_no)
        assert got is not None
        return got

    def close_round(
        self,
        job_id: str,
        round_no: int,
        *,
        state: Literal["closed", "failed", "cancelled"],
        now: float,
        new_digest: str | None = None,
        strategy_state: Mapping[str, Any] | None = None,
        contributors: Sequence[str] | None = None,
        metrics: Mapping[str, Any] | None = None,
        job_values: Mapping[str, Any] | None = None,
        lease: Lease | None = None,
    ) -> bool:
        """Close an open round and update its job, in one transaction; False when the round
        was not open any more (closed by an earlier term)."""
        with self._write(lease) as s:
            done = s.execute(
                update(t.rounds)
                .where(
                    t.rounds.c.job_id == job_id,
                    t.rounds.c.round == round_no,
                    t.rounds.c.state == "open",
                )
                .values(
                    state=state,
                    closed_at=now,
                    new_digest=new_digest,
                    strategy_state=dict(strategy_state) if strategy_state is not None else None,
                    contributors=list(contributors) if contributors is not None else None,
                    metrics=dict(metrics) if metrics is not None else None,
                )
            )
            if rowcount(done) != 1:
                return False
            if job_values:
                s.execute(
                    update(t.jobs).where(t.jobs.c.id == job_id).values(**job_values, updated_at=now)
                )
            return True

    def note_reject(self, job_id: str, round_no: int, reason: str) -> None:
        """Count one refused upload against its round (when the round exists)."""
        with self._write() as s:
            row = (
                s.execute(
                    self._locked(
                        select(t.rounds.c.rejects).where(
                            t.rounds.c.job_id == job_id, t.rounds.c.round == round_no
                        )
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                return
            rejects = dict(row["rejects"] or {})
            rejects[reason] = int(rejects.get(reason, 0)) + 1
            s.execute(
                update(t.rounds)
                .where(t.rounds.c.job_id == job_id, t.rounds.c.round == round_no)
                .values(rejects=rejects)
            )

    # ------------------------------------------------------------------ updates

    def record_update(
        self,
        job_id: str,
        round_no: int,
        device_id: str,
        *,
        digest: str,
        size: int,
        compression: str,
        now: float,
        late_ok: bool = False,
    ) -> RecordOutcome:
        """Record an uploaded update, if its round is still open (or closed, with
        ``late_ok``: a late update the job folds into a later round) and the device selected.

        ``duplicate``: this device's update for this round was already recorded with the
        same digest (nothing changes); ``conflict``: with another digest (the first stays).
        """
        with self._write() as s:
            rnd = (
                s.execute(
                    self._locked(
                        select(t.rounds.c.state, t.rounds.c.tokens).where(
                            t.rounds.c.job_id == job_id, t.rounds.c.round == round_no
                        )
                    )
                )
                .mappings()
                .first()
            )
            if rnd is None:
                return "unknown"
            if rnd["state"] != "open" and not (late_ok and rnd["state"] == "closed"):
                return "closed"
            if device_id not in (rnd["tokens"] or {}):
                return "not_selected"
            inserted = s.execute(
                self._insert(t.updates)
                .values(
                    job_id=job_id,
                    round=round_no,
                    device_id=device_id,
                    digest=digest,
                    size=size,
                    compression=compression,
                    accepted_at=now,
                )
                .on_conflict_do_nothing(index_elements=["job_id", "round", "device_id"])
                .returning(t.updates.c.id)
            ).first()
            if inserted is not None:
                return "accepted"
            stored = s.execute(
                select(t.updates.c.digest).where(
                    t.updates.c.job_id == job_id,
                    t.updates.c.round == round_no,
                    t.updates.c.device_id == device_id,
                )
            ).scalar_one()
            return "duplicate" if stored == digest else "conflict"

    def link_result(
        self,
        job_id: str,
        round_no: int,
        device_id: str,
        *,
        result_id: str,
        examples: int,
        metrics: Mapping[str, Any],
    ) -> bool:
        """Attach the device's applied train result to its recorded update (once)."""
        with self._write() as s:
            done = s.execute(
                update(t.updates)
                .where(
                    t.updates.c.job_id == job_id,
                    t.updates.c.round == round_no,
                    t.updates.c.device_id == device_id,
                    t.updates.c.result_id.is_(None),
                )
                .values(result_id=result_id, examples=examples, metrics=dict(metrics))
            )
            return bool(rowcount(done))

    def update_of(self, job_id: str, round_no: int, device_id: str) -> UpdateRecord | None:
        """One device's recorded update for a round, if any."""
        query = select(t.updates).where(
            t.updates.c.job_id == job_id,
            t.updates.c.round == round_no,
            t.updates.c.device_id == device_id,
        )
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return UpdateRecord.of(row) if row is not None else None

    def updates_for(self, job_id: str, round_no: int) -> list[UpdateRecord]:
        query = (
            select(t.updates)
            .where(t.updates.c.job_id == job_id, t.updates.c.round == round_no)
            .order_by(t.updates.c.id)
        )
        with self.engine.connect() as conn:
            return [UpdateRecord.of(r) for r in conn.execute(query).mappings()]

    def examples_by_device(self, job_id: str) -> dict[str, int]:
        """The latest reported number of local examples of each device in this job."""
        query = (
            select(t.updates.c.device_id, t.updates.c.examples)
            .where(t.updates.c.job_id == job_id, t.updates.c.examples.is_not(None))
            .order_by(t.updates.c.id)
        )
        with self.engine.connect() as conn:
            return {d: int(n) for d, n in conn.execute(query)}

    # ------------------------------------------------------------------ job code in flight

    def begin_load(self, job_id: str, what: str, *, now: float, lease: Lease | None = None) -> int:
        """Count a call of the job's code about to start; returns how many earlier calls
        began and never returned (the process died in them)."""
        with self._write(lease) as s:
            row = (
                s.execute(self._locked(select(t.loads).where(t.loads.c.job_id == job_id)))
                .mappings()
                .first()
            )
            before = int(row["attempts"]) if row is not None else 0
            values = {"attempts": before + 1, "what": what[:64], "started_at": now}
            if row is None:
                s.execute(insert(t.loads).values(job_id=job_id, **values))
            else:
                s.execute(update(t.loads).where(t.loads.c.job_id == job_id).values(**values))
            return before

    def end_load(self, job_id: str) -> None:
        """The call of the job's code returned (or raised): nothing is in flight."""
        with self._write() as s:
            s.execute(delete(t.loads).where(t.loads.c.job_id == job_id))

    # ------------------------------------------------------------------ keys

    def secret(self, name: str, make: Callable[[], bytes], *, now: float) -> bytes:
        """The secret ``name``, created with ``make()`` by the first process that asks (every
        replica gets the same bytes)."""
        with self._write() as s:
            s.execute(
                self._insert(t.keys)
                .values(name=name, secret=make(), created_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            query = select(t.keys.c.secret).where(t.keys.c.name == name)
            return bytes(s.execute(query).scalar_one())
