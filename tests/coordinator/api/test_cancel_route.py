"""``POST /v1/tasks/{id}/cancel`` over an ASGI transport: idempotent answers, 404, 409 with
the state, the optional reason bounded like every JSON body, and the metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import Assignment, RetryPolicy, Store
from lepton.protocol.messages import Result, TaskAck
from tests.coordinator.conftest import in_process_api
from tests.coordinator.factories import new_task, sample

CAP = 2048


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(
        f"sqlite:///{tmp_path / 'api.db'}", retry=RetryPolicy(), sqlite_synchronous="normal"
    )


@pytest.fixture
async def api(store: Store) -> AsyncIterator[tuple[httpx.AsyncClient, Metrics, list[int]]]:
    metrics = Metrics()
    woken: list[int] = []
    async with in_process_api(
        store,
        metrics,
        overrides={"http.max_body_bytes": CAP},
        on_submit=lambda: woken.append(1),
    ) as client:
        yield client, metrics, woken
    store.close()


def _running(store: Store, task_id: str) -> None:
    now = time.time()
    store.devices.record_capacity([sample("a", received_at=now)])
    store.tasks.submit(new_task(task_id, now=now))
    (d,) = store.tasks.assign([Assignment(task_id=task_id, device_id="a")], now)
    store.tasks.mark_dispatched([(d.task_id, d.attempt)], now)
    store.tasks.apply_acks("a", [TaskAck(task_id=task_id, accepted=True)], now)


async def test_pending_task_is_cancelled_at_once_and_idempotently(
    api: tuple[httpx.AsyncClient, Metrics, list[int]], store: Store
) -> None:
    client, metrics, _ = api
    store.tasks.submit(new_task("t1"))
    r = await client.post("/v1/tasks/t1/cancel", json={"reason": "changed my mind"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["state"], body["cancel_reason"]) == ("cancelled", "changed my mind")
    assert body["last_error"] == "cancelled: changed my mind"
    # Again, without a body: the same answer, the first reason kept.
    r = await client.post("/v1/tasks/t1/cancel")
    assert r.status_code == 200, r.text
    assert r.json()["cancel_reason"] == "changed my mind"
    assert (await client.get("/v1/tasks", params={"state": "cancelled"})).json()[0]["id"] == "t1"
    assert metrics.value("lepton_task_cancels_total", {"outcome": "cancelled"}) == 2
    # One transition, however often it is asked for.
    assert metrics.value("lepton_task_transitions_total", {"state": "cancelled"}) == 1
    health = (await client.get("/v1/health")).json()
    assert health["tasks"]["cancelled"] == 1


async def test_running_task_is_marked_and_the_leader_woken(
    api: tuple[httpx.AsyncClient, Metrics, list[int]], store: Store
) -> None:
    client, metrics, woken = api
    _running(store, "t1")
    r = await client.post("/v1/tasks/t1/cancel", json={})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["state"], body["cancel_reason"]) == ("running", "requested")
    assert body["cancel_requested_at"] is not None
    assert woken == [1]
    assert metrics.value("lepton_task_cancels_total", {"outcome": "requested"}) == 1
    (due,) = store.cancels.cancels_due(time.time(), resend_after_s=60)
    assert (due.task_id, due.device_id) == ("t1", "a")


async def test_unknown_and_finished_tasks(
    api: tuple[httpx.AsyncClient, Metrics, list[int]], store: Store
) -> None:
    client, metrics, _ = api
    r = await client.post("/v1/tasks/ghost/cancel")
    assert r.status_code == 404, r.text
    _running(store, "t1")
    ok = Result(id="r1", task_id="t1", status="succeeded", output={"echo": 1})
    store.results.apply_results("a", [ok], time.time())
    r = await client.post("/v1/tasks/t1/cancel")
    assert r.status_code == 409, r.text
    assert r.json() == {
        "detail": "task t1 has already succeeded",
        "reason": "task_finished",
        "state": "succeeded",
    }
    assert store.tasks.get_task("t1").output == {"echo": 1}
    assert metrics.value("lepton_task_cancels_total", {"outcome": "unknown"}) == 1
    assert metrics.value("lepton_task_cancels_total", {"outcome": "finished"}) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "reason"),
    [
        (b'{"reason": "' + b"x" * 300 + b'"}', {"content-type": "application/json"}, 422, None),
        (b'{"reason": "two\\nlines"}', {"content-type": "application/json"}, 422, None),
        (b'{"reason": "ok", "extra": 1}', {"content-type": "application/json"}, 422, None),
        (b'{"reason": ""}', {"content-type": "application/json"}, 422, None),
        (b'["not", "an", "object"]', {"content-type": "application/json"}, 422, None),
        (
            b"reason=x",
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
        ),
        (b"[" * 40 + b"]" * 40, {"content-type": "application/json"}, 400, "too_deep"),
        (
            b'{"reason": "' + b"x" * CAP + b'"}',
            {"content-type": "application/json"},
            413,
            "too_large",
        ),
    ],
    ids=["long", "newline", "extra-key", "empty", "array", "form", "deep", "oversized"],
)
async def test_hostile_bodies_are_refused_and_change_nothing(
    api: tuple[httpx.AsyncClient, Metrics, list[int]],
    store: Store,
    body: bytes,
    headers: dict[str, str],
    status: int,
    reason: str | None,
) -> None:
    client, metrics, _ = api
    store.tasks.submit(new_task("t1"))
    r = await client.post("/v1/tasks/t1/cancel", content=body, headers=headers)
    assert r.status_code == status, r.text
    if reason is not None:
        assert r.json()["reason"] == reason
    rejects = "invalid" if reason is None else reason
    assert metrics.value("lepton_http_rejects_total", {"reason": rejects}) == 1
    assert store.tasks.get_task("t1").state == "pending"
    # An id longer than any task id is refused before the store sees it.
    r = await client.post("/v1/tasks/" + "x" * 65 + "/cancel")
    assert r.status_code == 422
