"""Which body rules a route gets: JSON routes the ``[http]`` cap, routes that read their own
body (update uploads) their own cap, with a deadline that grows with the bytes received."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Request

from lepton.coordinator.auth.guard import require
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import RetryPolicy, Store
from tests.coordinator.conftest import in_process_api

CAP = 1024


def upload_router() -> APIRouter:
    router = APIRouter()

    # Declared like every route (an undeclared one is refused 403 undeclared_route).
    @router.put("/v1/raw/{name}", dependencies=[require(Scope.FL_WRITE)])
    async def put_raw(name: str, request: Request) -> dict[str, int]:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"size": size}

    return router


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Metrics]]:
    store = Store.open(
        f"sqlite:///{tmp_path / 'api.db'}", retry=RetryPolicy(), sqlite_synchronous="normal"
    )
    metrics = Metrics()
    overrides = {
        "http.max_body_bytes": CAP,
        "http.body_timeout_s": 0.5,
        "http.upload_min_bytes_per_s": 1000,
    }
    async with in_process_api(
        store, metrics, overrides=overrides, routers=[upload_router()]
    ) as client:
        yield client, metrics
    store.close()


async def test_json_routes_take_the_cap_and_uploads_their_own(
    api: tuple[httpx.AsyncClient, Metrics],
) -> None:
    client, metrics = api
    params = {"x": "a" * CAP}
    r = await client.post("/v1/tasks", json={"kind": "echo", "params": params})
    assert r.status_code == 413, r.text
    assert r.json()["reason"] == "too_large"
    assert r.headers["connection"] == "close"
    r = await client.put("/v1/raw/blob", content=b"b" * (64 * CAP))
    assert r.status_code == 200, r.text
    assert r.json() == {"size": 64 * CAP}
    assert metrics.value("lepton_http_rejects_total", {"reason": "too_large"}) == 1


async def stalled(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(30)
    yield b"never"


async def test_a_stalled_upload_gets_408_and_a_slow_one_finishes(
    api: tuple[httpx.AsyncClient, Metrics],
) -> None:
    client, metrics = api
    start = time.monotonic()
    r = await client.put("/v1/raw/blob", content=stalled(b"x" * 100))
    assert r.status_code == 408, r.text
    # 0.5 s, plus 0.1 s earned by the 100 bytes that came
    assert time.monotonic() - start < 2
    assert metrics.value("lepton_http_rejects_total", {"reason": "body_timeout"}) == 1

    async def slow() -> AsyncIterator[bytes]:
        for _ in range(4):  # 1.2 s in all, past the 0.5 s base; each 400 bytes earn 0.4 s
            yield b"y" * 400
            await asyncio.sleep(0.3)

    r = await client.put("/v1/raw/blob", content=slow())
    assert r.status_code == 200, r.text
    assert r.json() == {"size": 1600}
