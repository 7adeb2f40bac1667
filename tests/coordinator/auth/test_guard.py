"""The bearer-token guard in front of a real coordinator's HTTP app (over its socket): every
route found by walking the app is closed without a token, each refusal says why, scopes
decide the rest, and what gets through or is refused is audited."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
from fastapi import APIRouter, Request
from sqlalchemy import insert

from lepton.coordinator.auth import credentials, tables
from lepton.coordinator.auth.guard import AUDIT_BURST, require
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import RetryPolicy, Store
from lepton.protocol import routes
from tests.coordinator.auth.app_routes import (
    GUARD_REASONS,
    PUBLIC,
    app_of,
    protected,
    reason,
    served,
)
from tests.coordinator.conftest import in_process_api
from tests.support.api import api_client, bearer, new_operator_token
from tests.support.broker import free_port

MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]


@pytest.fixture
async def coordinator(make_coordinator: MakeCoordinator) -> AsyncIterator[Coordinator]:
    """A running coordinator (this folder's conftest names a broker link ``coordinator``)."""
    async with make_coordinator() as c:
        yield c


@pytest.fixture
async def http(coordinator: Coordinator) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the coordinator's API holding no token."""
    assert coordinator.api_url is not None
    async with httpx.AsyncClient(base_url=coordinator.api_url, timeout=10) as client:
        yield client


def device_token(c: Coordinator, device_id: str = "pi-1") -> str:
    """An enrolled device's HTTP token, its auth_devices row written directly (enrolment
    makes these; this test only needs the row)."""
    token = credentials.new("device")
    with c.store.engine.begin() as conn:
        conn.execute(
            insert(tables.devices).values(
                device_id=device_id,
                token_hash=credentials.digest(token),
                claim="test-claim",
                enrolled_at=time.time(),
            )
        )
    return token


# ---------------------------------------------------------------- every route is closed


async def test_every_route_but_health_and_docs_needs_a_token(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    everything = served(app_of(coordinator))
    closed = protected(coordinator)
    # The walk found the routes of every feature (a walk that found none would pass).
    templates = {s.template for s in closed}
    for known in (routes.DEVICES, routes.TASKS, routes.TASK_CANCEL, routes.BLOB, routes.MODELS,
                  routes.MODEL_DEPLOY, routes.FL_JOBS, routes.FL_UPLOAD, routes.AUDIT,
                  routes.METRICS):  # fmt: skip
        assert known in templates, known
    assert {s.template for s in everything} - templates <= PUBLIC
    undeclared = [str(s) for s in closed if s.need is None]
    assert undeclared == [], f"routes that declare no scope (require(...)): {undeclared}"
    for s in closed:
        r = await http.request(s.method, s.path)
        assert r.status_code == 401, (str(s), r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer", str(s)
        if s.method != "HEAD":
            assert r.json()["reason"] == "missing_token", str(s)
            assert "lepton tokens create" in r.json()["detail"]


async def test_health_and_the_api_description_are_open(http: httpx.AsyncClient) -> None:
    assert (await http.get(routes.HEALTH)).status_code == 200
    assert (await http.get("/openapi.json")).status_code == 200
    assert (await http.get("/docs")).status_code == 200


# ---------------------------------------------------------------- 401: which token, why


async def test_bad_tokens_get_401_with_their_reason(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    store = AuthStore(coordinator.store.engine)
    revoked = new_operator_token(coordinator, name="gone")
    store.revoke_token("gone")
    expired = new_operator_token(coordinator, name="old", expires_at=time.time() - 1)
    cases = {
        "Bearer garbage": "malformed_token",
        "Bearer " + "lpo_" + "x" * 200: "malformed_token",  # longer than any token of ours
        "Bearer " + credentials.new("claim"): "malformed_token",  # a claim is not a token
        "Bearer " + credentials.new("operator"): "unknown_token",
        "Bearer " + credentials.new("device"): "unknown_token",
        f"Bearer {revoked}": "revoked_token",
        f"Bearer {expired}": "expired_token",
        "Basic dXNlcjpwYXNz": "missing_token",  # not a bearer token at all
        "Bearer": "missing_token",
        "": "missing_token",
    }
    for header, why in cases.items():
        r = await http.get(routes.DEVICES, headers={"Authorization": header})
        assert r.status_code == 401, (header, r.text)
        assert r.json()["reason"] == why, (header, r.json())
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith("Bearer"), header
        if why != "missing_token":
            assert 'error="invalid_token"' in challenge, header
    # The token's state is in the listing, its secret nowhere.
    states = {t.name: t.state(time.time()) for t in store.list_tokens()}
    assert (states["gone"], states["old"]) == ("revoked", "expired")


# ---------------------------------------------------------------- 403: which scope


async def test_a_token_lacking_the_routes_scope_gets_403_naming_it(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    """For every route: every scope but the one it needs is refused, naming the one it
    needs; that scope alone gets through the guard."""
    everyday = {s.value for s in Scope} - {Scope.ADMIN.value}
    families: set[str] = set()
    for s in protected(coordinator):
        assert s.need is not None
        need = s.need.scope.value
        families.add(need)
        others = new_operator_token(coordinator, sorted(everyday - {need}) or ["fleet:read"])
        r = await http.request(s.method, s.path, headers=bearer(others))
        assert r.status_code == 403, (str(s), r.text)
        challenge = r.headers["www-authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert f'scope="{need}"' in challenge
        if s.method != "HEAD":
            assert r.json()["scope"] == need
            assert r.json()["reason"] == "missing_scope"
        just = new_operator_token(coordinator, [need])
        r = await http.request(s.method, s.path, headers=bearer(just))
        assert r.status_code not in (401, 403) or reason(r.content) not in GUARD_REASONS, (
            str(s),
            r.text,
        )
    # Each area of the API was checked, tokens and the audit log (admin) among them.
    assert {"fleet:read", "tasks:write", "models:write", "fl:write", "metrics:read"} <= families
    assert "admin" in families


async def test_admin_gets_through_to_every_route(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    admin = bearer(new_operator_token(coordinator, ["admin"]))
    for s in protected(coordinator):
        r = await http.request(s.method, s.path, headers=admin)
        assert r.status_code < 500, (str(s), r.status_code, r.text)
        assert reason(r.content) not in GUARD_REASONS, (str(s), r.text)


async def test_a_device_token_on_an_operator_route_gets_403(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    device = bearer(device_token(coordinator))
    operator_only = [s for s in protected(coordinator) if s.need and not s.need.devices]
    assert operator_only
    for s in operator_only:
        r = await http.request(s.method, s.path, headers=device)
        assert r.status_code == 403, (str(s), r.text)
        if s.method != "HEAD":
            assert r.json()["reason"] == "device_not_allowed"
    # A device route lets it through to the route (which has no such blob).
    r = await http.get(routes.path(routes.BLOB, digest="0" * 64), headers=device)
    assert r.status_code == 404, r.text
    assert reason(r.content) not in GUARD_REASONS


async def test_a_revoked_device_gets_401(coordinator: Coordinator, http: httpx.AsyncClient) -> None:
    from sqlalchemy import update

    token = device_token(coordinator, "pi-2")
    with coordinator.store.engine.begin() as conn:
        conn.execute(
            update(tables.devices)
            .where(tables.devices.c.device_id == "pi-2")
            .values(revoked_at=time.time())
        )
    r = await http.get(routes.path(routes.BLOB, digest="0" * 64), headers=bearer(token))
    assert (r.status_code, r.json()["reason"]) == (401, "revoked_device")


async def test_a_route_that_declares_no_owner_is_refused(tmp_path: Path) -> None:
    router = APIRouter()
    ran: list[str] = []

    @router.get("/v1/open")  # no require(...): nobody may call it, an admin included
    def open_route() -> dict[str, str]:
        ran.append("open")
        return {"open": "yes"}

    @router.post("/v1/declared", dependencies=[require(Scope.TASKS_WRITE)])
    async def declared(request: Request) -> dict[str, int]:
        ran.append("declared")
        return {"size": len(await request.body())}

    store = Store.open(f"sqlite:///{tmp_path / 'a.db'}", retry=RetryPolicy())
    try:
        async with in_process_api(store, routers=[router]) as admin:
            r = await admin.get("/v1/open")
            assert (r.status_code, r.json()["reason"]) == (403, "undeclared_route")
            assert (await admin.post("/v1/declared", content=b"abc")).json() == {"size": 3}
        async with in_process_api(store, routers=[router], scopes=()) as anonymous:
            # Refused before the route: it does not run, its body is not handed to it.
            r = await anonymous.post("/v1/declared", content=b"x" * (1 << 20))
            assert r.status_code == 401
        assert ran == ["declared"]
    finally:
        store.close()


# ---------------------------------------------------------------- audit


async def test_mutating_calls_are_audited_with_actor_and_status(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    token = new_operator_token(coordinator, ["tasks:write", "fleet:read"], name="ops")
    headers = bearer(token)
    ok = await http.post(routes.TASKS, json={"kind": "echo"}, headers=headers)
    assert ok.status_code == 201
    bad = await http.post(routes.TASKS, json={"kind": "echo", "max_attempts": 0}, headers=headers)
    assert bad.status_code == 422
    await http.get(routes.TASKS, headers=headers)  # reads are not audited
    await http.post(routes.TASKS, json={"kind": "echo"})  # refused: audited as anonymous
    log = AuthStore(coordinator.store.engine).audit_log()
    mine = [(a.actor, a.action, a.outcome) for a in log if a.actor == "operator:ops"]
    assert mine == [
        ("operator:ops", "POST /v1/tasks", "422"),
        ("operator:ops", "POST /v1/tasks", "ok"),
    ]
    refused = [a for a in log if a.actor == "anonymous"]
    assert [(a.action, a.outcome) for a in refused] == [("POST /v1/tasks", "401 missing_token")]
    assert refused[0].remote == "127.0.0.1"


async def test_refusals_are_audited_up_to_a_burst_and_all_counted(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    n = AUDIT_BURST + 15
    for i in range(n):
        r = await http.get(routes.DEVICES, headers={"Authorization": f"Bearer nonsense{i}"})
        assert r.status_code == 401
    rows = AuthStore(coordinator.store.engine).audit_log(actor="anonymous", limit=1000)
    assert len(rows) == AUDIT_BURST
    m = coordinator.metrics
    assert m.value("lepton_auth_refusals_total", {"reason": "malformed_token"}) == n
    assert m.value("lepton_audit_suppressed_total") == n - AUDIT_BURST


# ---------------------------------------------------------------- /metrics


async def test_metrics_need_the_metrics_scope(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    assert (await http.get(routes.METRICS)).status_code == 401
    reader = bearer(new_operator_token(coordinator, ["fleet:read"]))
    r = await http.get(routes.METRICS, headers=reader)
    assert (r.status_code, r.json()["scope"]) == (403, "metrics:read")
    scraper = bearer(new_operator_token(coordinator, ["metrics:read"]))
    r = await http.get(routes.METRICS, headers=scraper)
    assert r.status_code == 200
    assert "lepton_auth_refusals_total" in r.text
    # A scraper's token reads nothing else.
    assert (await http.get(routes.DEVICES, headers=scraper)).status_code == 403


async def test_metrics_public_opens_metrics_only(make_coordinator: MakeCoordinator) -> None:
    async with make_coordinator(http__metrics_public=True) as c:
        assert c.api_url is not None
        async with httpx.AsyncClient(base_url=c.api_url) as http:
            assert (await http.get(routes.METRICS)).status_code == 200
            assert (await http.get(routes.DEVICES)).status_code == 401


async def test_metrics_port_serves_metrics_without_a_token(
    make_coordinator: MakeCoordinator,
) -> None:
    port = free_port()
    async with (
        make_coordinator(http__metrics_port=port, http__metrics_host="127.0.0.1") as c,
        httpx.AsyncClient() as http,
    ):
        r = await http.get(f"http://127.0.0.1:{port}{routes.METRICS}")
        assert r.status_code == 200
        assert "lepton_http_rejects_total" in r.text
        # That listener has nothing else; the API's /metrics still wants a token.
        assert (await http.get(f"http://127.0.0.1:{port}{routes.DEVICES}")).status_code == 404
        assert (await http.get(f"{c.api_url}{routes.METRICS}")).status_code == 401


# ---------------------------------------------------------------- the API's description


async def test_openapi_lists_the_bearer_scheme_on_protected_routes(
    coordinator: Coordinator, http: httpx.AsyncClient
) -> None:
    doc = (await http.get("/openapi.json")).json()
    scheme = doc["components"]["securitySchemes"]["LeptonToken"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    secured = 0
    for s in protected(coordinator):
        if s.method == "HEAD":
            continue
        operation = doc["paths"][s.template][s.method.lower()]
        assert {"LeptonToken": []} in operation.get("security", []), str(s)
        secured += 1
    assert secured >= 15
    assert "security" not in doc["paths"][routes.HEALTH]["get"]


# ---------------------------------------------------------------- the admin token of tests


async def test_the_test_helper_client_is_authorised(coordinator: Coordinator) -> None:
    async with api_client(coordinator, ["fleet:read"]) as reader:
        assert (await reader.get(routes.DEVICES)).status_code == 200
        assert (await reader.post(routes.TASKS, json={"kind": "echo"})).status_code == 403
