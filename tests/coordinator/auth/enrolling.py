"""Helpers of the enrolment tests: an operator token on a running coordinator, claims made
and redeemed over its real HTTP API."""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from lepton.coordinator.auth import credentials
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes


def operator_token(c: Coordinator, *scopes: str) -> str:
    token = credentials.new("operator")
    AuthStore(c.store.engine).create_token(
        f"op-{uuid.uuid4().hex[:8]}",
        credentials.digest(token),
        scopes or ("admin",),
        created_by="test",
    )
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_claims(api: httpx.AsyncClient, op: str, **body: Any) -> list[dict[str, Any]]:
    r = await api.post(routes.CLAIMS, json=body, headers=bearer(op))
    assert r.status_code == 201, r.text
    claims: list[dict[str, Any]] = r.json()["claims"]
    return claims


async def enroll(
    api: httpx.AsyncClient, claim: str | None, device_id: str, **fields: Any
) -> httpx.Response:
    headers = bearer(claim) if claim else {}
    return await api.post(routes.ENROLL, json={"device_id": device_id, **fields}, headers=headers)


def metric(c: Coordinator, name: str, labels: dict[str, str] | None = None) -> float:
    return c.metrics.value(name, labels or {})
