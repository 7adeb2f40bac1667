"""Plain values read from the authentication tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import RowMapping

PrincipalKind = Literal["operator", "device", "insecure"]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: an operator token's name and scopes, or an enrolled device."""

    kind: PrincipalKind
    name: str  # the token's name, or the device id
    scopes: frozenset[str] = frozenset()

    @property
    def actor(self) -> str:
        """How the audit log names the caller."""
        return f"{self.kind}:{self.name}"

    @property
    def device_id(self) -> str | None:
        return self.name if self.kind == "device" else None


@dataclass(frozen=True, slots=True)
class TokenRecord:
    name: str
    scopes: tuple[str, ...]
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    @classmethod
    def of(cls, row: RowMapping) -> TokenRecord:
        return cls(
            name=row["name"],
            scopes=tuple(row["scopes"]),
            created_at=row["created_at"],
            created_by=row["created_by"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            last_used_at=row["last_used_at"],
        )

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self, now: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "scopes": list(self.scopes),
            "state": self.state(now),
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: float
    actor: str
    action: str
    target: str
    outcome: str
    remote: str
    detail: Any

    @classmethod
    def of(cls, row: RowMapping) -> AuditRecord:
        return cls(**{k: row[k] for k in FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS}


FIELDS = ("id", "at", "actor", "action", "target", "outcome", "remote", "detail")
