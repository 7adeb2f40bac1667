"""Throughput observations and the persisted estimator snapshot.

Any replica that applies a result queues its measured duration as an observation; only the
leader folds observations into its estimator, and it saves the new snapshot and deletes the
observations it used in one transaction, so each observation counts exactly once even if the
leader dies mid-way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, select

from lepton.coordinator.store.base import StoreBase, check_fence
from lepton.coordinator.store.records import Lease, Observation, from_row
from lepton.coordinator.store.schema import EstimateRow, ObservationRow


class EstimateRepo(StoreBase):
    def load_estimates(self, name: str = "default") -> dict[str, Any] | None:
        with self._read() as session:
            row = session.get(EstimateRow, name)
            return dict(row.snapshot) if row is not None else None

    def pending_observations(self, *, limit: int = 10_000) -> list[Observation]:
        with self._read() as session:
            rows = session.scalars(select(ObservationRow).order_by(ObservationRow.id).limit(limit))
            return [from_row(Observation, r) for r in rows]

    def save_estimates(
        self,
        snapshot: dict[str, Any],
        consumed: Sequence[int],
        now: float,
        *,
        name: str = "default",
        lease: Lease | None = None,
    ) -> None:
        """Store the snapshot and drop the observations it includes, atomically."""
        with self._write() as session:
            if lease is not None:
                check_fence(session, lease, now, lock=self.dialect == "postgresql")
            row = session.get(EstimateRow, name)
            if row is None:
                session.add(
                    EstimateRow(
                        name=name, snapshot=snapshot, observations=len(consumed), updated_at=now
                    )
                )
            else:
                row.snapshot = snapshot
                row.observations += len(consumed)
                row.updated_at = now
            if consumed:
                session.execute(delete(ObservationRow).where(ObservationRow.id.in_(list(consumed))))
