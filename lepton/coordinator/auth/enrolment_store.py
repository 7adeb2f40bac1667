"""Enrolment claims and device identities in SQL: every method one transaction.

A claim is redeemed by one conditional ``UPDATE`` (``uses < max_uses``, not expired, not
revoked) whose row count says whether this enrolment got a use: two enrolments racing for
the last use of a claim cannot both get it, on SQLite or PostgreSQL. The device's identity
is written in the same transaction, so a claim use and an identity exist together or not
at all. Secrets never reach these tables: callers pass hashes
(:func:`lepton.coordinator.auth.credentials.digest`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import RowMapping, insert, select, update
from sqlalchemy.exc import IntegrityError

from lepton.common.errors import LeptonError
from lepton.coordinator.auth import tables as t
from lepton.coordinator.auth.store import revoke_named
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.store.base import StoreBase, rowcount


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    """A claim as stored (no secret)."""

    name: str
    created_at: float
    created_by: str
    expires_at: float
    max_uses: int
    uses: int
    device_class: str | None
    device_group: str | None
    revoked_at: float | None

    @classmethod
    def of(cls, row: RowMapping) -> ClaimRecord:
        return cls(**{k: row[k] for k in cls.__slots__})

    def refusal(self, now: float) -> str | None:
        """Why this claim cannot enrol a device now (None: it can)."""
        if self.revoked_at is not None:
            return "claim_revoked"
        if self.expires_at <= now:
            return "claim_expired"
        if self.uses >= self.max_uses:
            return "claim_used"
        return None

    def to_dict(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__slots__}
        out["state"] = self.refusal(now) or "usable"
        return out


@dataclass(frozen=True, slots=True)
class Enrolled:
    """An enrolled device's identity (no secret)."""

    device_id: str
    claim: str
    device_class: str | None
    device_group: str | None
    enrolled_at: float
    revoked_at: float | None


class EnrolmentRefusedError(LeptonError):
    """A store-level refusal: ``reason`` is one of the contract's refusal reasons."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class EnrolmentStore(StoreBase):
    """Claims, redemption and revocation. ``EnrolmentStore(store.engine)``."""

    # ------------------------------------------------------------------ claims

    def create_claims(self, rows: list[dict[str, Any]]) -> list[ClaimRecord]:
        """Insert claims (``name``, ``token_hash``, ``created_by``, ``expires_at``,
        ``max_uses``, ``device_class``, ``device_group``) in one transaction."""
        now = time.time()
        with self._write() as s:
            s.execute(insert(t.claims), [{"created_at": now, "uses": 0, **r} for r in rows])
            names = [r["name"] for r in rows]
            found = s.execute(select(t.claims).where(t.claims.c.name.in_(names))).mappings()
            by_name = {r["name"]: ClaimRecord.of(r) for r in found}
        return [by_name[n] for n in names]

    def list_claims(self) -> list[ClaimRecord]:
        with self._read() as s:
            rows = s.execute(select(t.claims).order_by(t.claims.c.created_at, t.claims.c.name))
            return [ClaimRecord.of(r) for r in rows.mappings()]

    def revoke_claim(self, name: str, now: float | None = None) -> ClaimRecord:
        """Revoke a claim by name (idempotent; unknown: :class:`NotFoundError`)."""
        with self._write() as s:
            row = revoke_named(s, t.claims, name, now, what="claim")
        return ClaimRecord.of(row)

    def claim(self, token_hash: str) -> ClaimRecord | None:
        with self._read() as s:
            row = (
                s.execute(select(t.claims).where(t.claims.c.token_hash == token_hash))
                .mappings()
                .first()
            )
        return None if row is None else ClaimRecord.of(row)

    # ------------------------------------------------------------------ identities

    def identity(self, device_id: str) -> Enrolled | None:
        with self._read() as s:
            row = (
                s.execute(select(t.devices).where(t.devices.c.device_id == device_id))
                .mappings()
                .first()
            )
        if row is None:
            return None
        return Enrolled(
            row["device_id"],
            row["claim"],
            row["device_class"],
            row["device_group"],
            row["enrolled_at"],
            row["revoked_at"],
        )

    def redeem(
        self,
        claim_hash: str,
        device_id: str,
        token_hash: str,
        *,
        device_class: str | None,
        device_group: str | None,
        cert_serial: str | None = None,
        now: float | None = None,
    ) -> str:
        """Use one use of the claim and write the device's identity, in one transaction;
        returns the claim's name. :class:`EnrolmentRefusedError` (nothing written):
        ``claim_used`` / ``claim_expired`` / ``claim_revoked`` / ``unknown_claim`` when no use
        was left, ``already_enrolled`` when the id holds an identity not revoked."""
        now = time.time() if now is None else now
        c = t.claims.c
        try:
            with self._write() as s:
                used = s.execute(
                    update(t.claims)
                    .where(
                        c.token_hash == claim_hash,
                        c.uses < c.max_uses,
                        c.expires_at > now,
                        c.revoked_at.is_(None),
                    )
                    .values(uses=c.uses + 1)
                )
                row = s.execute(select(t.claims).where(c.token_hash == claim_hash)).mappings()
                claim = row.first()
                if claim is None:
                    raise EnrolmentRefusedError("unknown_claim")
                if rowcount(used) != 1:
                    raise EnrolmentRefusedError(ClaimRecord.of(claim).refusal(now) or "claim_used")
                values = {
                    "token_hash": token_hash,
                    "claim": claim["name"],
                    "device_class": device_class,
                    "device_group": device_group,
                    "cert_serial": cert_serial,
                    "enrolled_at": now,
                    "revoked_at": None,
                    "revoked_by": None,
                }
                # A revoked identity is replaced (new secrets); a live one never is.
                d = t.devices.c
                replaced = s.execute(
                    update(t.devices)
                    .where(d.device_id == device_id, d.revoked_at.is_not(None))
                    .values(**values)
                )
                if rowcount(replaced) == 0:
                    s.execute(insert(t.devices).values(device_id=device_id, **values))
                return str(claim["name"])
        except IntegrityError:  # a live identity holds the id (the insert's primary key)
            raise EnrolmentRefusedError("already_enrolled") from None

    def revoke_device(self, device_id: str, by: str, now: float | None = None) -> Enrolled:
        """Mark the identity revoked (idempotent: the first time stays); its HTTP token stops
        working at once. Unknown id: :class:`NotFoundError`."""
        now = time.time() if now is None else now
        with self._write() as s:
            s.execute(
                update(t.devices)
                .where(t.devices.c.device_id == device_id, t.devices.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_by=by[:128])
            )
        found = self.identity(device_id)
        if found is None:
            raise NotFoundError("device identity", device_id)
        return found

    def revoked_ids(self) -> frozenset[str]:
        """Every device whose identity is revoked."""
        with self._read() as s:
            rows = s.execute(
                select(t.devices.c.device_id).where(t.devices.c.revoked_at.is_not(None))
            )
            return frozenset(r[0] for r in rows)
