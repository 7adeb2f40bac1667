"""HTTP routes of authentication: ``GET /v1/audit`` (scope ``admin``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.auth.store import AuthStore
from lepton.protocol import routes

Filter = Annotated[str | None, Query(max_length=128, pattern=r"^[\x20-\x7e]*$")]


def make_router(store: AuthStore) -> APIRouter:
    router = APIRouter(tags=["auth"])

    @router.get(routes.AUDIT, dependencies=[require(Scope.ADMIN)])
    def audit_log(  # noqa: PLR0917 - query parameters
        since: Annotated[float | None, Query(ge=0)] = None,
        actor: Filter = None,
        action: Filter = None,
        outcome: Filter = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        before_id: Annotated[int | None, Query(ge=1)] = None,
    ) -> list[dict[str, Any]]:
        """Audit records, newest first: who did what, when, from where, and the outcome."""
        records = store.audit_log(
            since=since,
            actor=actor,
            action=action,
            outcome=outcome,
            limit=limit,
            before_id=before_id,
        )
        return [r.to_dict() for r in records]

    return router
