"""The release registry's database side: published releases and devices' update status.

:meth:`ReleaseStore.publish` takes a bundle tar, verifies it against the coordinator's trust
root (:mod:`.bundle`), puts the signed envelope and every file into the model registry's
content-addressed blob store, and records the release with its files. Publishing the same
manifest again changes nothing and returns the same record; another manifest for a name and
version already published is refused (:class:`ReleaseConflictError`) unless it is for device
classes no existing manifest of that version can match (a version built per architecture).

:class:`DeviceUpdateRepo` keeps the last update status each device reported (its birth
message), written only when it changed and never replaced by an older one.
"""

from __future__ import annotations

import builtins
import hashlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError

from lepton.common.errors import LeptonError
from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.releases import tables
from lepton.coordinator.releases.bundle import open_verified
from lepton.coordinator.releases.records import DeviceUpdate, ReleaseFile, ReleaseRecord
from lepton.coordinator.store.base import StoreBase
from lepton.protocol.messages import UpdateStatus
from lepton.protocol.releases import Manifest, Root

__all__ = [
    "DeviceUpdate",
    "DeviceUpdateRepo",
    "ReleaseConflictError",
    "ReleaseFile",
    "ReleaseRecord",
    "ReleaseStore",
]

log = logging.getLogger(__name__)

_r = tables.releases
_f = tables.release_files
_u = tables.device_updates
_WILDCARDS: Final = "*?["


class ReleaseConflictError(LeptonError):
    """Another manifest of this name and version is published for overlapping classes."""

    def __init__(self, name: str, version: str, detail: str) -> None:
        self.name, self.version, self.detail = name, version, detail
        super().__init__(f"release {name} {version}: {detail}")


def _literal_prefix(pattern: str) -> str:
    cut = min((i for i, ch in enumerate(pattern) if ch in _WILDCARDS), default=len(pattern))
    return pattern[:cut]


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some device class could match both fnmatch patterns (conservative: True
    unless they provably cannot)."""
    wild_a, wild_b = any(c in a for c in _WILDCARDS), any(c in b for c in _WILDCARDS)
    if not wild_a and not wild_b:
        return a == b
    if not wild_a:
        return fnmatchcase(a, b)
    if not wild_b:
        return fnmatchcase(b, a)
    pa, pb = _literal_prefix(a), _literal_prefix(b)
    return pa.startswith(pb) or pb.startswith(pa)


class ReleaseStore(StoreBase):
    """Releases on ``engine``, their bytes in ``registry``'s blob store. ``trust_root()``
    gives the root bundles are checked against (read at each publish, so a rotated root
    file needs no restart); ``work_dir``: where bundles are unpacked (removed after)."""

    def __init__(
        self,
        engine: Engine,
        registry: ModelRegistry,
        trust_root: Callable[[], Root],
        *,
        work_dir: Path,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(engine)
        self.registry = registry
        self.trust_root = trust_root
        self.work_dir = work_dir
        self.clock = clock

    # ------------------------------------------------------------------ publish

    def publish(self, bundle_path: Path, *, published_by: str = "") -> builtins.list[ReleaseRecord]:
        """Verify and store the bundle at ``bundle_path``; its release records.

        ``ReleaseRefused`` (with the reason) for a bundle that does not verify,
        :class:`ReleaseConflictError` for another manifest of a published name and version.
        """
        now = self.clock()
        root = self.trust_root()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix="bundle-", dir=self.work_dir))
        try:
            opened = open_verified(bundle_path, scratch, root, now=now)
            m, envelope = opened.manifest, opened.envelope
            digest = hashlib.sha256(envelope).hexdigest()
            existing = _published(m, digest, self.get(m.name, m.version))
            if existing is not None:
                return [existing]
            self.registry.put_bytes(envelope, expected=digest)
            for entry in m.files:
                with (opened.files_dir / entry.path).open("rb") as fh:
                    self.registry.put_stream(fh, expected=entry.sha256)
            return [self._record(m, digest, len(envelope), published_by, now)]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _record(
        self, m: Manifest, digest: str, size: int, published_by: str, now: float
    ) -> ReleaseRecord:
        row: dict[str, Any] = {
            "kind": m.kind,
            "name": m.name,
            "version": m.version,
            "device_classes": list(m.device_classes),
            "manifest_digest": digest,
            "manifest_size": size,
            "security_floor": m.security_floor,
            "created": float(m.created),
            "expires": float(m.expires),
            "published_at": now,
            "published_by": published_by[:128],
            "file_count": len(m.files),
            "total_bytes": sum(f.length for f in m.files),
        }
        try:
            with self._write() as s:
                # Checked again under the write lock: two publishers of one version race.
                stmt = select(_r).where(_r.c.name == m.name, _r.c.version == m.version)
                rows = [ReleaseRecord.of(r) for r in s.execute(self._locked(stmt)).mappings()]
                same = _published(m, digest, rows)
                if same is not None:
                    return same
                release_id = s.execute(insert(_r).values(**row).returning(_r.c.id)).scalar_one()
                s.execute(
                    insert(_f),
                    [
                        {
                            "release_id": release_id,
                            "path": f.path,
                            "sha256": f.sha256,
                            "length": f.length,
                        }
                        for f in m.files
                    ],
                )
        except IntegrityError:  # the same manifest, published at the same moment
            same = _published(m, digest, self.get(m.name, m.version))
            if same is None:
                raise
            return same
        log.info("published release %s %s (%s)", m.name, m.version, digest[:12])
        return ReleaseRecord.of({"id": release_id, **row})

    # ------------------------------------------------------------------ reads

    def get(self, name: str, version: str) -> builtins.list[ReleaseRecord]:
        """Every manifest published for ``name`` at ``version`` (in publication order)."""
        stmt = select(_r).where(_r.c.name == name, _r.c.version == version).order_by(_r.c.id)
        with self._read() as s:
            return [ReleaseRecord.of(r) for r in s.execute(stmt).mappings()]

    def for_device(self, name: str, version: str, device_class: str) -> ReleaseRecord | None:
        """The manifest of ``name`` at ``version`` for a device of ``device_class``."""
        for r in self.get(name, version):
            if any(fnmatchcase(device_class, p) for p in r.device_classes):
                return r
        return None

    def list(self, name: str | None = None) -> builtins.list[ReleaseRecord]:
        """Every release (of ``name``), by name then version."""
        stmt = select(_r)
        if name is not None:
            stmt = stmt.where(_r.c.name == name)
        with self._read() as s:
            rows = [ReleaseRecord.of(r) for r in s.execute(stmt).mappings()]
        return sorted(rows, key=lambda r: r.sort_key)

    def by_manifest(self, digest: str) -> ReleaseRecord | None:
        """The release whose signed envelope has sha256 ``digest``."""
        stmt = select(_r).where(_r.c.manifest_digest == digest).order_by(_r.c.id).limit(1)
        with self._read() as s:
            row = s.execute(stmt).mappings().first()
        return None if row is None else ReleaseRecord.of(row)

    def files(self, release_id: int) -> builtins.list[ReleaseFile]:
        """A release's files, by path."""
        stmt = (
            select(_f.c.path, _f.c.sha256, _f.c.length)
            .where(_f.c.release_id == release_id)
            .order_by(_f.c.path)
        )
        with self._read() as s:
            return [ReleaseFile(**dict(r)) for r in s.execute(stmt).mappings()]


class DeviceUpdateRepo(StoreBase):
    """The last update status of each device (see module doc)."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(engine)
        self.clock = clock

    def put(
        self, device_id: str, status: UpdateStatus, *, received_at: float | None = None
    ) -> bool:
        """Store ``status`` for ``device_id``; True when it changed what was stored."""
        return bool(self.put_many([(device_id, status)], received_at=received_at))

    def put_many(
        self,
        items: Sequence[tuple[str, UpdateStatus]],
        *,
        received_at: float | None = None,
    ) -> builtins.list[DeviceUpdate]:
        """Store each status (in order, one transaction); the records that changed. A
        status older (by the device's ``at``) than the stored one is ignored: a retained
        birth delivered late must not undo a newer report."""
        received = self.clock() if received_at is None else received_at
        latest: dict[str, DeviceUpdate] = {}
        for device_id, st in items:
            latest[device_id] = DeviceUpdate(
                device_id=device_id,
                version=st.version,
                outcome=st.outcome,
                target=st.target,
                reason=st.reason,
                slot=st.slot,
                floor=st.floor,
                task_id=st.task_id,
                at=float(st.at),
                received_at=received,
            )
        if not latest:
            return []
        changed: builtins.list[DeviceUpdate] = []
        with self._write() as s:
            stmt = self._locked(select(_u).where(_u.c.device_id.in_(sorted(latest))))
            stored = {r["device_id"]: DeviceUpdate.of(r) for r in s.execute(stmt).mappings()}
            for device_id in sorted(latest):
                new, old = latest[device_id], stored.get(device_id)
                row = new.to_dict()
                if old is None:
                    s.execute(insert(_u).values(**row))
                elif _same(old, new) or new.at < old.at:
                    continue
                else:
                    s.execute(update(_u).where(_u.c.device_id == device_id).values(**row))
                changed.append(new)
        return changed

    def get_many(self, ids: Iterable[str]) -> dict[str, DeviceUpdate]:
        """The stored status of each of ``ids`` that has one."""
        wanted = sorted(set(ids))
        out: dict[str, DeviceUpdate] = {}
        with self._read() as s:
            for i in range(0, len(wanted), 500):
                stmt = select(_u).where(_u.c.device_id.in_(wanted[i : i + 500]))
                out.update({r["device_id"]: DeviceUpdate.of(r) for r in s.execute(stmt).mappings()})
        return out


def _published(m: Manifest, digest: str, rows: Sequence[ReleaseRecord]) -> ReleaseRecord | None:
    """Of the manifests published for ``m``'s name and version (``rows``): the one that is
    ``m`` itself (``digest``), else None; :class:`ReleaseConflictError` when another one is
    of another kind or for device classes ``m``'s could overlap."""
    for r in rows:
        if r.manifest_digest == digest:
            return r
    for r in rows:
        if r.kind != m.kind:
            raise ReleaseConflictError(m.name, m.version, f"published already as {r.kind}")
        clash = [
            (a, b) for a in m.device_classes for b in r.device_classes if patterns_overlap(a, b)
        ]
        if clash:
            raise ReleaseConflictError(
                m.name,
                m.version,
                f"another manifest ({r.manifest_digest[:12]}) is published for device class"
                f" {clash[0][1]!r}, which {clash[0][0]!r} overlaps",
            )
    return None


def _same(a: DeviceUpdate, b: DeviceUpdate) -> bool:
    """Equal but for when the coordinator received them."""
    return a.to_dict() | {"received_at": 0} == b.to_dict() | {"received_at": 0}
