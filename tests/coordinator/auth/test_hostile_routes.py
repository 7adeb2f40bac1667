"""Hostile requests to every route of a real coordinator's app, with and without tokens.

Generated: a route found by walking the app (or a wrong method on it), hostile path values
and query strings, an ``Authorization`` header that is missing, empty, garbage, the wrong
scheme, too long, not UTF-8, a revoked, expired or device token, or a good token of any
scope; and a body that is oversized, truncated JSON, nested thousands deep, wrongly typed
JSON or raw bytes. Whatever comes: no 5xx, the service keeps running, and a refused request
leaves every stored table as it was (the audit log aside, which records refusals).
"""

from __future__ import annotations

import json
import string
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, inspect, select, text

from lepton.coordinator.auth import credentials, tables
from lepton.coordinator.auth.scopes import Scope
from lepton.coordinator.auth.store import AuthStore
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.coordinator.auth.app_routes import GUARD_REASONS, Served, app_of, reason, served
from tests.coordinator.auth.test_guard import device_token
from tests.support.api import new_operator_token

MakeCoordinator = Callable[..., AbstractAsyncContextManager[Coordinator]]

MAX_BODY = 64 << 10
MAX_EXAMPLES = 1000
MIN_EXAMPLES = 900  # fewer tried (hypothesis gave up early) fails the test


class World:
    """The coordinator under test, its app's routes, and the tokens examples draw from."""

    def __init__(self, c: Coordinator) -> None:
        self.c = c
        self.routes = served(app_of(c))
        self.tokens: dict[str, str] = {
            scope.value: new_operator_token(c, [scope.value]) for scope in Scope
        }
        self.tokens["device"] = device_token(c, "hostile-device")
        self.tokens["revoked"] = new_operator_token(c, ["admin"], name="revoked")
        AuthStore(c.store.engine).revoke_token("revoked")
        self.tokens["expired"] = new_operator_token(
            c, ["admin"], name="expired", expires_at=time.time() - 1
        )
        names = inspect(c.store.engine).get_table_names()
        self.tables = sorted(n for n in names if n != tables.audit.name)
        assert {"tasks", "devices", "fl_jobs", "auth_tokens", "auth_devices"} <= set(self.tables)
        self.tally: Counter[str] = Counter()

    def fingerprint(self) -> dict[str, Any]:
        """Every table's row count, and the tokens' revocation state (``last_used_at`` and
        the audit log change on every request by design)."""
        with self.c.store.engine.connect() as conn:
            counts = {
                n: conn.execute(text(f'SELECT count(*) FROM "{n}"')).scalar_one()
                for n in self.tables
            }
            tokens = conn.execute(
                select(tables.tokens.c.name, tables.tokens.c.revoked_at).order_by(
                    tables.tokens.c.name
                )
            ).all()
            counts["tasks_by_state"] = conn.execute(
                text("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")
            ).all()
        counts["tokens"] = [tuple(t) for t in tokens]
        return counts


@pytest.fixture
async def world(make_coordinator: MakeCoordinator) -> AsyncIterator[World]:
    async with make_coordinator(http__max_body_bytes=MAX_BODY) as c:
        yield World(c)


@pytest.fixture
def tally(world: World, request: pytest.FixtureRequest) -> Iterator[Counter[str]]:
    """Outcomes of the examples; at the end their number is checked and reported."""
    yield world.tally
    n = world.tally["examples"]
    request.node.user_properties.append(("examples", n))
    summary = ", ".join(f"{k}={v}" for k, v in sorted(world.tally.items()))
    sys.__stderr__.write(f"\nhostile routes: {summary}\n")  # type: ignore[union-attr]
    assert n >= MIN_EXAMPLES, f"only {n} examples were tried"


# ---------------------------------------------------------------- strategies

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=40,
)
plausible = st.fixed_dictionaries(
    {},
    optional={
        "kind": st.sampled_from(["echo", "infer", "train", "deploy"]) | json_value,
        "params": json_value,
        "name": st.text(max_size=70) | json_value,
        "model": st.sampled_from(["lepton.models.digits:DigitsCNN", "os:system"]) | json_value,
        "rounds": json_value,
        "device_id": json_value,
        "reason": json_value,
        "version": json_value,
        "precision": json_value,
    },
)


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


bodies = st.one_of(
    st.none(),
    json_value.map(_json_bytes),  # wrongly typed
    plausible.map(_json_bytes),
    st.tuples(plausible.map(_json_bytes), st.floats(0, 1)).map(  # truncated
        lambda t: t[0][: int(len(t[0]) * t[1])]
    ),
    st.integers(1, 6000).map(lambda d: b'{"params": ' + b"[" * d + b"1" + b"]" * d + b"}"),
    st.integers(1, 6000).map(lambda d: b"{" * d),  # deep and unfinished
    st.integers(MAX_BODY - 8, MAX_BODY * 3).map(lambda n: b"x" * n),  # oversized
    st.binary(max_size=256),
)
TOKEN_KINDS = [*(s.value for s in Scope), "device", "revoked", "expired"]
garbage_text = st.text(alphabet=string.printable.strip(), max_size=80)
headers_auth = st.one_of(
    st.none(),
    st.just(""),
    st.just("Bearer"),
    st.just("Bearer "),
    garbage_text.map(lambda t: "Bearer " + t),
    garbage_text.map(lambda t: "Basic " + t),
    garbage_text,
    st.sampled_from(sorted(credentials.PREFIX.values())).flatmap(
        lambda p: garbage_text.map(lambda t: f"Bearer {p}{t}")
    ),
    st.integers(129, 20_000).map(lambda n: "Bearer lpo_" + "a" * n),
    st.binary(min_size=1, max_size=40)
    .filter(lambda b: b"\r" not in b and b"\n" not in b and b"\x00" not in b)
    .map(lambda b: b"Bearer " + b),
    st.sampled_from(TOKEN_KINDS).map(lambda k: ("token", k)),
)
path_values = st.one_of(
    st.just("1"),
    st.just("0" * 64),
    st.text(max_size=300),
    st.sampled_from(["..", "%00", "-1", "99999999999999999999", "a/b", " ", "ä"]),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "state", "since", "kind", "device", "before_id", "actor", "x"]),
    st.text(max_size=40) | st.integers().map(str) | st.sampled_from(["NaN", "-1", "1e999"]),
    max_size=4,
)
content_types = st.sampled_from(
    ["application/json", "application/octet-stream", "text/plain", "application/msgpack", None]
)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])


def fill(s: Served, values: list[str]) -> str:
    parts = s.template.split("{")
    out = parts[0]
    for i, part in enumerate(parts[1:]):
        _, rest = part.split("}", 1)
        out += quote(values[i % len(values)], safe="") + rest
    return out


@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_hostile_requests_to_every_route(
    world: World, tally: Counter[str], data: st.DataObject
) -> None:
    route: Served = data.draw(st.sampled_from(world.routes), label="route")
    method = data.draw(st.one_of(st.just(route.method), methods), label="method")
    values = data.draw(st.lists(path_values, min_size=1, max_size=3), label="path values")
    path = fill(route, values)
    auth = data.draw(headers_auth, label="authorization")
    body = data.draw(bodies, label="body")
    ctype = data.draw(content_types, label="content-type")
    query = data.draw(queries, label="query")
    headers: dict[str, Any] = {}
    if isinstance(auth, tuple):
        headers["Authorization"] = f"Bearer {world.tokens[auth[1]]}"
    elif auth is not None:
        headers["Authorization"] = auth
    if ctype:
        headers["Content-Type"] = ctype
    before = world.fingerprint()
    transport = httpx.ASGITransport(app=app_of(world.c), raise_app_exceptions=True)
    async with httpx.AsyncClient(transport=transport, base_url="http://coordinator") as client:
        r = await client.request(method, path, content=body, headers=headers, params=query)
    world.tally["examples"] += 1
    world.tally[f"{r.status_code // 100}xx"] += 1
    assert r.status_code < 500, (method, path, headers, r.status_code, r.text[:300])
    why = reason(r.content)
    if r.status_code in (401, 403) and (why in GUARD_REASONS or method == "HEAD"):
        world.tally["refused_by_guard"] += 1
        assert world.fingerprint() == before, (method, path, why)
    if r.status_code == 401:
        assert r.headers["www-authenticate"].startswith("Bearer")


async def test_the_service_is_alive_after_hostile_traffic(world: World) -> None:
    """The same kinds of requests at once over a real socket, then the health check."""
    c = world.c
    assert c.api_url is not None
    async with httpx.AsyncClient(base_url=c.api_url, timeout=10) as client:
        for s in world.routes:
            for auth in ("Bearer \u00e4" * 3, "Bearer " + "x" * 5000, ""):
                r = await client.request(
                    s.method,
                    s.path,
                    content=b"{" * 4000,
                    headers={"Authorization": auth.encode("utf-8"), "Content-Type": "a/b"},
                )
                assert r.status_code < 500, (str(s), r.text[:200])
        r = await client.get(routes.HEALTH)
        assert r.status_code == 200
    with c.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(tables.tokens)).scalar_one() >= 3
