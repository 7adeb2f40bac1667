"""The HTTP API over an ASGI transport (no broker needed): views, submission, validation."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import Assignment, RetryPolicy, Store
from tests.coordinator.conftest import in_process_api
from tests.coordinator.factories import sample


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(
        f"sqlite:///{tmp_path / 'api.db'}", retry=RetryPolicy(), sqlite_synchronous="normal"
    )


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    metrics = Metrics()
    metrics.watch_store(store.devices.count_devices, store.tasks.count_tasks)
    submitted: list[int] = []
    async with in_process_api(
        store,
        metrics,
        overrides={"fleet": "default"},
        raise_app_exceptions=True,
        is_leader=lambda: True,
        mqtt_connected=lambda: True,
        on_submit=lambda: submitted.append(1),
    ) as client:
        client.submitted = submitted  # type: ignore[attr-defined]
        yield client


async def test_health_and_openapi(api: httpx.AsyncClient) -> None:
    r = await api.get("/v1/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert body["instance_id"] == "api-test"
    assert body["tasks"]["pending"] == 0
    spec = (await api.get("/openapi.json")).json()
    for path in (
        "/v1/health",
        "/v1/devices",
        "/v1/devices/{device_id}",
        "/v1/tasks",
        "/v1/tasks/{task_id}",
        "/v1/tasks/{task_id}/explain",
    ):
        assert path in spec["paths"], path
    assert "post" in spec["paths"]["/v1/tasks"]


async def test_devices(api: httpx.AsyncClient, store: Store) -> None:
    now = time.time()
    store.devices.record_capacity(
        [sample("b", received_at=now), sample("a", received_at=now, slots=4)]
    )
    devices = (await api.get("/v1/devices")).json()
    assert [d["id"] for d in devices] == ["a", "b"]
    a = devices[0]
    assert a["state"] == "online"
    assert a["capacity"]["slots_total"] == 4
    assert a["capacity"]["fp32_gflops"] == 10.0
    assert a["heartbeat_deadline"] == pytest.approx(now + 15.0)
    assert (await api.get("/v1/devices", params={"state": "offline"})).json() == []
    assert (await api.get("/v1/devices", params={"state": "bogus"})).status_code == 422
    detail = (await api.get("/v1/devices/a")).json()
    assert detail["report"]["slots"]["total"] == 4
    assert detail["tasks"] == []
    missing = await api.get("/v1/devices/nope")
    assert missing.status_code == 404
    assert "nope" in missing.json()["detail"]


async def test_submit_list_show_explain(api: httpx.AsyncClient, store: Store) -> None:
    r = await api.post(
        "/v1/tasks",
        json={
            "kind": "echo",
            "params": {"payload": "hi", "sleep_s": 0.1},
            "demand_gops": 3,
            "precision": "int8",
            "max_attempts": 5,
            "expires_in_s": 60,
        },
    )
    assert r.status_code == 201, r.text
    task = r.json()
    assert task["state"] == "pending"
    assert task["precision"] == "int8"
    assert task["max_attempts"] == 5
    assert task["expires_at"] == pytest.approx(time.time() + 60, abs=5)
    assert api.submitted == [1]  # type: ignore[attr-defined]
    tid = task["id"]
    listed = (await api.get("/v1/tasks", params={"state": "pending"})).json()
    assert [t["id"] for t in listed] == [tid]
    assert (await api.get("/v1/tasks", params={"state": "failed"})).json() == []
    shown = (await api.get(f"/v1/tasks/{tid}")).json()
    assert shown["attempts"] == []
    assert shown["results"] == []
    body = (await api.get(f"/v1/tasks/{tid}/explain")).json()
    assert body["explanation"] is None
    store.devices.record_capacity([sample("a")])
    store.tasks.assign(
        [Assignment(task_id=tid, device_id="a", explanation={"device_id": "a"})], time.time()
    )
    body = (await api.get(f"/v1/tasks/{tid}/explain")).json()
    assert body == {
        "task_id": tid,
        "state": "assigned",
        "device_id": "a",
        "explanation": {"device_id": "a"},
    }
    shown = (await api.get(f"/v1/tasks/{tid}")).json()
    assert shown["attempts"][0]["device_id"] == "a"
    assert (await api.get("/v1/devices/a")).json()["tasks"][0]["id"] == tid
    assert (await api.get("/v1/tasks/nope/explain")).status_code == 404


async def test_duplicate_task_id_conflicts(api: httpx.AsyncClient) -> None:
    assert (await api.post("/v1/tasks", json={"kind": "echo", "id": "job-1"})).status_code == 201
    r = await api.post("/v1/tasks", json={"kind": "echo", "id": "job-1"})
    assert r.status_code == 409


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"kind": ""},
        {"kind": "bad kind"},
        {"kind": "echo", "unknown": 1},
        {"kind": "echo", "demand_gops": -1},
        {"kind": "echo", "demand_gops": "NaN"},
        {"kind": "echo", "precision": "fp16"},
        {"kind": "echo", "max_attempts": 0},
        {"kind": "echo", "expires_in_s": 0},
        {"kind": "echo", "id": "a/b"},
        {"kind": "echo", "params": {"k" * 100: 1}},
        {"kind": "echo", "params": {"blob": "x" * 300_000}},
        {"kind": "echo", "params": [1, 2]},
        {"kind": "echo", "device_id": "+"},
    ],
)
async def test_invalid_submissions_are_422(api: httpx.AsyncClient, body: dict[str, object]) -> None:
    r = await api.post("/v1/tasks", json=body)
    assert r.status_code == 422, r.text
    assert (await api.get("/v1/tasks")).json() == []


async def test_metrics_endpoint(api: httpx.AsyncClient, store: Store) -> None:
    store.devices.record_capacity([sample("a")])
    await api.post("/v1/tasks", json={"kind": "echo"})
    text = (await api.get("/metrics")).text
    assert 'lepton_devices{state="online"} 1.0' in text
    assert 'lepton_tasks{state="pending"} 1.0' in text
    assert "lepton_ingest_rejects_total" in text or "lepton_ingest_rejects" in text
    assert "lepton_scheduler_solve_seconds" in text


async def test_database_down_is_503(api: httpx.AsyncClient, store: Store, tmp_path: Path) -> None:
    store.close()
    (tmp_path / "api.db").unlink()
    (tmp_path / "api.db").mkdir()  # not a database any more
    r = await api.get("/v1/health")
    assert r.status_code == 503
    assert r.json()["status"] == "degraded"
