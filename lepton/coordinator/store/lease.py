"""Named leases by compare-and-set on one row: how replicas elect a scheduling leader.

A lease is free when its ``expires_at`` has passed. Taking it bumps ``epoch`` (the fencing
token); renewing it succeeds only for the same holder and epoch. Times come from the callers'
clocks, so replicas are expected to run with synchronised clocks (NTP), and the lease length
must be well above the clock skew.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from lepton.coordinator.store.base import StoreBase, rowcount
from lepton.coordinator.store.records import Lease
from lepton.coordinator.store.schema import LeaseRow


class LeaseRepo(StoreBase):
    """Acquire, renew and release named leases."""

    def acquire_lease(self, name: str, holder: str, now: float, ttl_s: float) -> Lease | None:
        """Take the lease if it is free (or already ours); None if someone else holds it."""
        for _ in range(2):
            try:
                with self._write() as session:
                    row = session.scalar(
                        self._locked(select(LeaseRow).where(LeaseRow.name == name))
                    )
                    if row is None:
                        row = LeaseRow(
                            name=name,
                            holder=holder,
                            epoch=1,
                            expires_at=now + ttl_s,
                            acquired_at=now,
                        )
                        session.add(row)
                        session.flush()
                    elif row.holder == holder and row.expires_at > now:
                        row.expires_at = now + ttl_s
                    elif row.expires_at <= now:
                        changed = rowcount(
                            session.execute(
                                update(LeaseRow)
                                .where(LeaseRow.name == name, LeaseRow.epoch == row.epoch)
                                .values(
                                    holder=holder,
                                    epoch=row.epoch + 1,
                                    expires_at=now + ttl_s,
                                    acquired_at=now,
                                )
                            )
                        )
                        if not changed:
                            return None
                        session.refresh(row)
                    else:
                        return None
                    return Lease(
                        name=name, holder=row.holder, epoch=row.epoch, expires_at=row.expires_at
                    )
            except IntegrityError:
                continue  # another replica inserted the row first; look again
        return None

    def renew_lease(self, lease: Lease, now: float, ttl_s: float) -> Lease | None:
        """Extend a held lease; None when it was lost (taken over after it expired)."""
        with self._write() as session:
            changed = rowcount(
                session.execute(
                    update(LeaseRow)
                    .where(
                        LeaseRow.name == lease.name,
                        LeaseRow.holder == lease.holder,
                        LeaseRow.epoch == lease.epoch,
                    )
                    .values(expires_at=now + ttl_s)
                )
            )
        if not changed:
            return None
        return Lease(
            name=lease.name, holder=lease.holder, epoch=lease.epoch, expires_at=now + ttl_s
        )

    def release_lease(self, lease: Lease) -> bool:
        """Give the lease up now (clean shutdown), so another replica need not wait it out."""
        with self._write() as session:
            changed = rowcount(
                session.execute(
                    update(LeaseRow)
                    .where(
                        LeaseRow.name == lease.name,
                        LeaseRow.holder == lease.holder,
                        LeaseRow.epoch == lease.epoch,
                    )
                    .values(expires_at=0.0)
                )
            )
        return bool(changed)

    def lease_holder(self, name: str) -> Lease | None:
        """The lease row as stored (holder may be expired), or None if never taken."""
        with self._read() as session:
            row = session.get(LeaseRow, name)
            if row is None:
                return None
            return Lease(
                name=row.name, holder=row.holder, epoch=row.epoch, expires_at=row.expires_at
            )
