"""Finding 10 of the hardening review: hostile JSON gets a 4xx with a reason, never a 500.

The app runs as the coordinator builds it (body limits, error handlers), over an ASGI
transport; the real-socket cases are in ``test_http_limits``.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lepton.coordinator.config import Config
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import RetryPolicy, Store
from lepton.coordinator.tasks.request import TaskRequest
from lepton.coordinator.tasks.submit import SubmissionError, build_task
from lepton.protocol import codec
from lepton.protocol.messages import Task
from tests.coordinator.conftest import in_process_api


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def deep_body(depth: int) -> bytes:
    """A submission whose params nest ``depth`` arrays (as text: json.dumps would recurse)."""
    return b'{"kind": "echo", "params": {"a": ' + b"[" * depth + b"1" + b"]" * depth + b"}}"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(
        f"sqlite:///{tmp_path / 'api.db'}", retry=RetryPolicy(), sqlite_synchronous="normal"
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
async def api(store: Store, metrics: Metrics) -> AsyncIterator[httpx.AsyncClient]:
    # A 500 is an answer here, compared like any other.
    async with in_process_api(store, metrics, overrides={"fleet": "default"}) as client:
        yield client


def rejects(metrics: Metrics, reason: str) -> float:
    return metrics.value("lepton_http_rejects_total", {"reason": reason})


async def post(
    api: httpx.AsyncClient, body: str | bytes, ctype: str = "application/json"
) -> httpx.Response:
    return await api.post("/v1/tasks", content=body, headers={"content-type": ctype})


@pytest.mark.parametrize("depth", [40, 900, 5000])
async def test_deep_params_get_a_400_with_a_reason(
    api: httpx.AsyncClient, store: Store, metrics: Metrics, depth: int
) -> None:
    r = await post(api, deep_body(depth))
    assert r.status_code == 400, r.text
    assert r.json()["reason"] == "too_deep"
    assert rejects(metrics, "too_deep") == 1
    assert store.tasks.count_tasks().get("pending", 0) == 0


async def test_params_as_deep_as_the_wire_allows_are_taken_and_decode(
    api: httpx.AsyncClient, store: Store
) -> None:
    # The body's top level is the message's: params may nest one level less than the codec.
    params = {"a": nested(codec.MAX_DEPTH - 2)}
    r = await post(api, json.dumps({"kind": "echo", "params": params}))
    assert r.status_code == 201, r.text
    task = store.tasks.get_task(r.json()["id"])
    message = Task(task_id=task.id, kind="echo", params=task.params, expires_at=task.expires_at)
    assert codec.decode(codec.encode(message), Task).params == params


async def test_a_msgpack_body_on_a_json_route_gets_415(
    api: httpx.AsyncClient, metrics: Metrics
) -> None:
    r = await post(api, b"\x81\xa4kind\xa4echo\xff", "application/msgpack")
    assert r.status_code == 415, r.text
    assert r.json()["reason"] == "unsupported_media_type"
    r = await api.post("/v1/tasks", content=b"\x81\xa4kind\xa4echo")  # no content type at all
    assert r.status_code == 415, r.text
    assert rejects(metrics, "unsupported_media_type") == 2


@pytest.mark.parametrize(
    "body",
    [
        '{"kind": "echo", "demand_gops": NaN}',
        '{"kind": "echo", "min_battery": -Infinity}',
        '{"kind": "echo", "demand_gops": 1e400}',
        '{"kind": "echo", "params": {"x": [1, Infinity]}}',
    ],
)
async def test_non_finite_numbers_get_a_422(api: httpx.AsyncClient, body: str) -> None:
    r = await post(api, body)
    assert r.status_code == 422, r.text
    assert "finite" in r.text


async def test_a_validation_error_on_bytes_is_a_422_not_a_500(api: httpx.AsyncClient) -> None:
    """The 422 once echoed each input back: bytes that were not UTF-8 (or a NaN) made it 500."""
    r = await api.post("/v1/tasks", json={"kind": "echo", "precision": "fp64", "params": []})
    assert r.status_code == 422
    assert {e["loc"][-1] for e in r.json()["detail"]} == {"precision", "params"}
    assert all("input" not in e for e in r.json()["detail"])


def test_build_task_refuses_what_the_agents_codec_would() -> None:
    """A task nested deeper than the codec allows was stored, then failed three sends."""
    cfg = Config()
    ok = build_task(cfg, TaskRequest(kind="echo", params={"a": nested(codec.MAX_DEPTH - 2)}))
    assert ok.params["a"] == nested(codec.MAX_DEPTH - 2)
    with pytest.raises(SubmissionError, match="too_deep") as info:
        build_task(cfg, TaskRequest(kind="echo", params={"a": nested(codec.MAX_DEPTH)}))
    assert info.value.field == "params"


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
fields = st.sampled_from(
    ["kind", "params", "id", "model_class", "precision", "demand_gops", "input_bytes",
     "memory_bytes", "runtime", "min_battery", "device_id", "max_attempts", "expires_in_s"]
)  # fmt: skip
submission = st.dictionaries(fields | st.text(max_size=8), json_value, max_size=6) | json_value
deep = st.integers(min_value=1, max_value=3000).map(deep_body)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=submission | deep,
    ctype=st.sampled_from(["application/json", "application/msgpack", "text/plain", ""]),
    raw=st.none() | st.binary(max_size=64),
)
async def test_no_submission_gets_a_5xx(
    api: httpx.AsyncClient, body: Any, ctype: str, raw: bytes | None
) -> None:
    if raw is not None:
        content = raw
    elif isinstance(body, bytes):
        content = body
    else:
        content = json.dumps(body, allow_nan=True).encode()
    headers = {"content-type": ctype} if ctype else {}
    r = await api.post("/v1/tasks", content=content, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 201:
        assert math.isfinite(r.json()["demand_gops"])
