"""Which blobs an enrolled device may download: those its own tasks name.

A device gets a blob when a task assigned to it or running on it, or one of its attempts
that ended within :data:`GRACE_S` (a retry after a crash resumes its download), names the
digest (:func:`lepton.protocol.tasks.blob_digests`: a deploy's model, a training or
evaluation round's global weights). Anything else answers as an unknown blob would (404),
so a device cannot learn which blobs exist.
"""

from __future__ import annotations

import time
from typing import Final

from sqlalchemy import or_, select

from lepton.coordinator.store.base import StoreBase
from lepton.coordinator.store.schema import AttemptRow, TaskRow
from lepton.protocol.tasks import DEPLOY, EVALUATE, TRAIN, blob_digests

GRACE_S: Final = 600.0
KINDS: Final = (DEPLOY, TRAIN, EVALUATE)


class BlobGrants(StoreBase):
    """``BlobGrants(store.engine).granted(device_id, digest)``."""

    def granted(self, device_id: str, digest: str, now: float | None = None) -> bool:
        """Whether ``device_id`` may fetch the blob ``digest`` (lower-case hex)."""
        now = time.time() if now is None else now
        digest = digest.lower()
        recent = or_(AttemptRow.finished_at.is_(None), AttemptRow.finished_at >= now - GRACE_S)
        by_attempt = (
            select(TaskRow.kind, TaskRow.params)
            .join(AttemptRow, AttemptRow.task_id == TaskRow.id)
            .where(AttemptRow.device_id == device_id, recent, TaskRow.kind.in_(KINDS))
        )
        current = select(TaskRow.kind, TaskRow.params).where(
            TaskRow.device_id == device_id,
            TaskRow.state.in_(("assigned", "running")),
            TaskRow.kind.in_(KINDS),
        )
        with self._read() as s:
            rows = [*s.execute(by_attempt), *s.execute(current)]
        return any(digest in blob_digests(kind, params or {}) for kind, params in rows)
