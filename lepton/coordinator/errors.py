"""Errors the coordinator raises on purpose, under the project's one root (``LeptonError``)."""

from __future__ import annotations

from lepton.common.errors import ConfigError, LeptonError

__all__ = [
    "ConfigError",
    "ConflictError",
    "LeaseLostError",
    "LeptonError",
    "NotFoundError",
    "UnavailableError",
]


class NotFoundError(LeptonError):
    """A device, task or result with this id does not exist."""

    def __init__(self, kind: str, ident: str) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident!r} not found")


class ConflictError(LeptonError):
    """The request collides with existing state (a task id already taken, say)."""

    def __init__(self, kind: str, ident: str, detail: str) -> None:
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident!r}: {detail}")


class LeaseLostError(LeptonError):
    """This process no longer holds the scheduling lease; leader-only writes are refused."""

    def __init__(self, name: str, holder: str) -> None:
        self.name = name
        self.holder = holder
        super().__init__(f"lease {name!r} is no longer held by {holder!r}")


class UnavailableError(LeptonError):
    """A dependency (broker, database) cannot be reached right now; retrying may succeed."""

    def __init__(self, what: str, detail: str = "") -> None:
        self.what = what
        super().__init__(f"{what} unavailable: {detail}" if detail else f"{what} unavailable")
