"""Every path protocol.routes defines is one a running coordinator serves (its OpenAPI)."""

from __future__ import annotations

from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.support.api import api_client


async def test_the_coordinator_serves_every_route_defined_once(coordinator: Coordinator) -> None:
    assert coordinator.api_url is not None
    async with api_client(coordinator) as api:
        served = set((await api.get("/openapi.json")).json()["paths"])
    defined = {
        v for k, v in vars(routes).items() if k.isupper() and isinstance(v, str) and v[:1] == "/"
    }
    assert defined - served == set()
    # And the API serves nothing under /v1 that is not defined there.
    assert {p for p in served if p.startswith("/v1/")} - defined == set()
