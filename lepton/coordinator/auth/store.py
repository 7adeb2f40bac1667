"""Operator tokens, device tokens and the audit log in SQL: every method one transaction.

Secrets never reach this module's tables: callers pass the hash
(:func:`lepton.coordinator.auth.credentials.digest`) and get plain records back. Methods are
synchronous and run in worker threads (FastAPI's thread pool, ``asyncio.to_thread``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Final

from sqlalchemy import RowMapping, Table, and_, delete, insert, or_, select, update
from sqlalchemy.orm import Session

from lepton.coordinator.auth import tables as t
from lepton.coordinator.auth.records import AuditRecord, Principal, TokenRecord
from lepton.coordinator.errors import ConflictError, NotFoundError
from lepton.coordinator.store.base import StoreBase, rowcount

#: ``last_used_at`` is written at most this often per token (not on every request).
TOUCH_EVERY_S: Final = 60.0
MAX_DETAIL_CHARS: Final = 2000


def revoke_named(
    session: Session, table: Table, name: str, now: float | None, *, what: str
) -> RowMapping:
    """Mark the row of ``table`` named ``name`` revoked unless it already is (idempotent, in
    the caller's transaction); the row, or :class:`NotFoundError` naming ``what``."""
    session.execute(
        update(table)
        .where(table.c.name == name, table.c.revoked_at.is_(None))
        .values(revoked_at=time.time() if now is None else now)
    )
    row = session.execute(select(table).where(table.c.name == name)).mappings().first()
    if row is None:
        raise NotFoundError(what, name)
    return row


class AuthStore(StoreBase):
    """Tokens, device identities' HTTP tokens and the audit log. ``AuthStore(store.engine)``."""

    # ------------------------------------------------------------------ operator tokens

    def create_token(
        self,
        name: str,
        token_hash: str,
        scopes: Iterable[str],
        *,
        created_by: str,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> TokenRecord:
        """Store a new token; a name in use (even revoked: names stay unique in the audit
        log) is a :class:`ConflictError`."""
        now = time.time() if now is None else now
        with self._write() as s:
            taken = s.execute(select(t.tokens.c.name).where(t.tokens.c.name == name)).first()
            if taken is not None:
                raise ConflictError("token", name, "name already used")
            s.execute(
                insert(t.tokens).values(
                    name=name,
                    token_hash=token_hash,
                    scopes=sorted(set(scopes)),
                    created_at=now,
                    created_by=created_by,
                    expires_at=expires_at,
                )
            )
            row = s.execute(select(t.tokens).where(t.tokens.c.name == name)).mappings().one()
        return TokenRecord.of(row)

    def list_tokens(self) -> list[TokenRecord]:
        with self._read() as s:
            rows = s.execute(select(t.tokens).order_by(t.tokens.c.name)).mappings().all()
        return [TokenRecord.of(r) for r in rows]

    def revoke_token(self, name: str, now: float | None = None) -> TokenRecord:
        """Revoke a token by name (idempotent); an unknown name is a :class:`NotFoundError`."""
        with self._write() as s:
            row = revoke_named(s, t.tokens, name, now, what="token")
        return TokenRecord.of(row)

    def operator(self, token_hash: str, now: float) -> tuple[Principal | None, str]:
        """The operator holding the token with this hash, or None and why not
        (``unknown``, ``revoked``, ``expired``). Marks the token used (at most once a
        minute)."""
        with self._read() as s:
            row = (
                s.execute(select(t.tokens).where(t.tokens.c.token_hash == token_hash))
                .mappings()
                .first()
            )
        if row is None:
            return None, "unknown_token"
        record = TokenRecord.of(row)
        state = record.state(now)
        if state != "active":
            return None, f"{state}_token"
        if record.last_used_at is None or now - record.last_used_at >= TOUCH_EVERY_S:
            with self._write() as s:
                s.execute(
                    update(t.tokens).where(t.tokens.c.name == record.name).values(last_used_at=now)
                )
        return Principal("operator", record.name, frozenset(record.scopes)), "ok"

    def device(self, token_hash: str) -> tuple[Principal | None, str]:
        """The enrolled device holding this HTTP token, or None and why not."""
        with self._read() as s:
            row = s.execute(
                select(t.devices.c.device_id, t.devices.c.revoked_at).where(
                    t.devices.c.token_hash == token_hash
                )
            ).first()
        if row is None:
            return None, "unknown_token"
        if row.revoked_at is not None:
            return None, "revoked_device"
        return Principal("device", row.device_id), "ok"

    # ------------------------------------------------------------------ audit

    def audit(
        self,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        *,
        remote: str = "",
        detail: Any = None,
        now: float | None = None,
    ) -> None:
        """Append one record (fields cut to their column sizes)."""
        if isinstance(detail, str) and len(detail) > MAX_DETAIL_CHARS:
            detail = detail[:MAX_DETAIL_CHARS]
        with self._write() as s:
            s.execute(
                insert(t.audit).values(
                    at=time.time() if now is None else now,
                    actor=actor[:128],
                    action=action[:64],
                    target=target[:256],
                    outcome=outcome[:32],
                    remote=remote[:64],
                    detail=detail,
                )
            )

    def audit_log(
        self,
        *,
        since: float | None = None,
        actor: str | None = None,
        action: str | None = None,
        outcome: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[AuditRecord]:
        """Newest first, filtered; ``before_id`` pages back."""
        q = select(t.audit)
        conds = []
        if since is not None:
            conds.append(t.audit.c.at >= since)
        if actor:
            conds.append(or_(t.audit.c.actor == actor, t.audit.c.actor.like(f"%:{actor}")))
        if action:
            conds.append(t.audit.c.action == action)
        if outcome:
            conds.append(t.audit.c.outcome == outcome)
        if before_id is not None:
            conds.append(t.audit.c.id < before_id)
        if conds:
            q = q.where(and_(*conds))
        q = q.order_by(t.audit.c.id.desc()).limit(limit)
        with self._read() as s:
            rows = s.execute(q).mappings().all()
        return [AuditRecord.of(r) for r in rows]

    def prune_audit(self, before: float) -> int:
        """Delete records older than ``before``; how many."""
        with self._write() as s:
            return rowcount(s.execute(delete(t.audit).where(t.audit.c.at < before)))
