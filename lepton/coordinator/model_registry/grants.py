"""Which blobs an enrolled device may download: those its own tasks name.

A device gets a blob when a task assigned to it or running on it, or one of its attempts
that ended within :data:`GRACE_S` (a retry after a crash resumes its download), names the
digest (:func:`lepton.protocol.tasks.blob_digests`: a deploy's model, a training or
evaluation round's global weights, an install's signed manifest), or when such an
``install`` task's release lists a file with that sha256 (``release_files``, looked up by
its sha256 index and the manifest digests the device's install tasks name). Anything else
answers as an unknown blob would (404), so a device cannot learn which blobs exist.
"""

from __future__ import annotations

import time
from typing import Final

from sqlalchemy import or_, select

from lepton.coordinator.releases.tables import release_files, releases
from lepton.coordinator.store.base import StoreBase
from lepton.coordinator.store.schema import AttemptRow, TaskRow
from lepton.protocol.tasks import DEPLOY, EVALUATE, INSTALL, TRAIN, blob_digests

GRACE_S: Final = 600.0
KINDS: Final = (DEPLOY, TRAIN, EVALUATE, INSTALL)


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
            named = [blob_digests(kind, params or {}) for kind, params in rows]
            if any(digest in n for n in named):
                return True
            manifests = {
                d for (kind, _), n in zip(rows, named, strict=True) if kind == INSTALL for d in n
            }
            if not manifests:
                return False
            listed = (
                select(release_files.c.release_id)
                .join(releases, releases.c.id == release_files.c.release_id)
                .where(
                    release_files.c.sha256 == digest,
                    releases.c.manifest_digest.in_(sorted(manifests)),
                )
                .limit(1)
            )
            return s.execute(listed).first() is not None
