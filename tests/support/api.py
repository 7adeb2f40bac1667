"""Operator tokens and authorised HTTP clients for tests of the coordinator's API.

Every route but ``/v1/health`` needs ``Authorization: Bearer <operator token>``. A test gets
one through the same :class:`AuthStore` the CLI's ``lepton tokens create`` uses, on the
coordinator's own database:

- :func:`operator_token` ``(target, scopes)``: a token (made once per database and scope set,
  then reused, so polling helpers do not fill the token table);
- :func:`api_client` ``(target, scopes)``: an ``httpx.AsyncClient`` on the coordinator's API
  with the header set;
- :class:`Endpoint`: a URL and a token, for coordinators that run as a subprocess (what
  :func:`api_client` and the polling helpers accept besides a :class:`Coordinator`);
- :func:`new_claim`: an enrolment claim made through the API (``POST /v1/claims``), what
  test devices exchange for their own identity;
- :func:`stored_claim`: the same made on the coordinator's database (where the caller cannot
  wait on its API: a synchronous fixture beside an in-process coordinator);
- :func:`enrol_devices`: devices (ids and state directories) enrolled with that claim, each
  then holding its own identity in its state directory, as ``lepton-agent enroll`` leaves it;
- :func:`guarded`: an app a test assembles from routers, behind the same guard.

``target`` is a running :class:`Coordinator`, a :class:`Store`, an ``Engine`` or a database
URL (the subprocess's ``--database``).
"""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, create_engine
from starlette.routing import Route

from lepton.coordinator.auth import credentials, tables
from lepton.coordinator.auth.enrolment_store import EnrolmentStore
from lepton.coordinator.auth.guard import Authenticator, AuthGuard
from lepton.coordinator.auth.metrics import AuthMetrics
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.service import Coordinator
from lepton.coordinator.store import Store
from lepton.protocol import routes
from lepton.sim.enrol import Device, Enrolment, enrol_fleet


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A coordinator's API reached over the network: its base URL and an operator token."""

    url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return bearer(self.token)

    def client(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, **kw)

    def sync_client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **kw)


Target = Coordinator | Store | Engine | str

# One token per (database, scopes): tests poll through many short-lived clients.
_tokens: weakref.WeakKeyDictionary[Engine, dict[tuple[str, ...], str]] = weakref.WeakKeyDictionary()
_url_tokens: dict[tuple[str, tuple[str, ...]], str] = {}


def bearer(token: str) -> dict[str, str]:
    """The header that carries ``token``."""
    return {"Authorization": f"Bearer {token}"}


def _engine_of(target: Target) -> Engine:
    if isinstance(target, Coordinator):
        return target.store.engine
    if isinstance(target, Store):
        return target.engine
    if isinstance(target, Engine):
        return target
    raise TypeError(f"no engine in {target!r}")


def new_operator_token(
    target: Target,
    scopes: Iterable[str] = ("admin",),
    *,
    name: str | None = None,
    expires_at: float | None = None,
) -> str:
    """A fresh operator token with ``scopes`` stored on ``target``'s database (never cached)."""
    name = name or f"test-{uuid.uuid4().hex[:10]}"
    token = credentials.new("operator")
    if isinstance(target, str):
        engine = create_engine(target)
        try:
            AuthStore(engine).create_token(
                name, credentials.digest(token), scopes, created_by="test", expires_at=expires_at
            )
        finally:
            engine.dispose()
        return token
    AuthStore(_engine_of(target)).create_token(
        name, credentials.digest(token), scopes, created_by="test", expires_at=expires_at
    )
    return token


def operator_token(target: Target, scopes: Iterable[str] = ("admin",)) -> str:
    """An operator token with ``scopes`` on ``target``'s database (made once, then reused)."""
    key = tuple(sorted(set(scopes)))
    if isinstance(target, str):
        if (target, key) not in _url_tokens:
            _url_tokens[target, key] = new_operator_token(target, key)
        return _url_tokens[target, key]
    engine = _engine_of(target)
    known = _tokens.setdefault(engine, {})
    if key not in known:
        known[key] = new_operator_token(engine, key)
    return known[key]


def endpoint(c: Coordinator | Endpoint, scopes: Iterable[str] = ("admin",)) -> Endpoint:
    """The API of ``c`` with an operator token holding ``scopes``."""
    if isinstance(c, Endpoint):
        return c
    if c.api_url is None:
        raise ValueError("this coordinator serves no HTTP API (http.enabled is off)")
    return Endpoint(c.api_url, operator_token(c, scopes))


def api_client(
    c: Coordinator | Endpoint, scopes: Iterable[str] = ("admin",), **kw: Any
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` on ``c``'s API carrying an operator token with ``scopes``."""
    return endpoint(c, scopes).client(**kw)


async def new_claim(
    c: Coordinator | Endpoint, *, uses: int = 1, expires_in_s: float = 3600.0, **body: Any
) -> str:
    """A fresh enrolment claim of ``c``, good for ``uses`` devices, made over its API by an
    operator with ``devices:write`` (``body``: further :class:`ClaimsIn` fields)."""
    async with api_client(c, ("devices:write",)) as client:
        r = await client.post(
            routes.CLAIMS, json={"uses": uses, "expires_in_s": expires_in_s, **body}
        )
    if r.status_code != 201:
        raise AssertionError(f"claim refused: {r.status_code} {r.text}")
    token: str = r.json()["claims"][0]["token"]
    return token


def stored_claim(target: Target, *, uses: int = 1, expires_in_s: float = 3600.0) -> str:
    """A fresh enrolment claim good for ``uses`` devices, written on ``target``'s database
    as ``POST /v1/claims`` writes one (its hash only; the token returned)."""
    token = credentials.new("claim")
    row = {
        "name": f"claim-{uuid.uuid4().hex[:12]}",
        "token_hash": credentials.digest(token),
        "created_by": "test",
        "expires_at": time.time() + expires_in_s,
        "max_uses": uses,
        "device_class": None,
        "device_group": None,
    }
    if isinstance(target, str):
        engine = create_engine(target)
        try:
            EnrolmentStore(engine).create_claims([row])
        finally:
            engine.dispose()
    else:
        EnrolmentStore(_engine_of(target)).create_claims([row])
    return token


async def enrol_devices(c: Coordinator | Endpoint, devices: Mapping[str, Path]) -> None:
    """Enrol each device (``{device id: its agent.state_dir}``) with ``c`` through one claim
    made for them all; an agent config naming that state directory then runs as the device."""
    claim = await new_claim(c, uses=len(devices))
    await enrol_fleet(
        Enrolment(endpoint(c).url, claim), [Device(i, state) for i, state in devices.items()]
    )


def guarded(engine: Engine, *routers: APIRouter, public: frozenset[str] = frozenset()) -> AuthGuard:
    """An app of ``routers`` (mounted ad hoc by a test) behind the coordinator's auth guard,
    checking tokens on ``engine`` (its auth tables made if missing), as :func:`create_app`
    puts it in front of the service's app."""
    tables.metadata.create_all(engine, checkfirst=True)
    app = FastAPI()
    for router in routers:
        app.include_router(router)
    routes = [r for router in routers for r in router.routes if isinstance(r, Route)]
    auth = Authenticator(AuthStore(engine), AuthMetrics(CollectorRegistry()))
    return AuthGuard(app, routes=routes, auth=auth, public=public)
