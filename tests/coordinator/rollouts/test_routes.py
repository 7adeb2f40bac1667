"""The rollout routes: create, list, status with device rows, operator moves; scopes; and
hostile input refused with nothing stored."""

from __future__ import annotations

from typing import Any

import pytest

from lepton.coordinator.rollouts.routes import make_router
from lepton.coordinator.store import Store
from lepton.protocol import routes
from tests.coordinator.conftest import in_process_api
from tests.coordinator.rollouts.conftest import Rig, add_devices

PLAN: dict[str, Any] = {
    "kind": "model",
    "name": "digits",
    "version": "2",
    "phases": [{"count": 1}, {"percent": 100, "approval": True}],
    "rate_count": 60,
    "max_in_flight": 5,
}


def action(rollout_id: str, what: str) -> str:
    return routes.path(routes.ROLLOUT_ACTION, rollout_id=rollout_id, action=what)


async def test_create_status_and_moves(rig: Rig, store: Store) -> None:
    add_devices(store, 3)
    async with in_process_api(store, routers=[make_router(rig.control)]) as api:
        r = await api.post(routes.ROLLOUTS, json=PLAN)
        assert r.status_code == 201, r.text
        created = r.json()
        rollout_id = created["id"]
        assert (created["state"], created["total"], created["counts"]["pending"]) == (
            "running",
            3,
            3,
        )
        assert created["created_by"].startswith("operator:")
        rig.settle(rollout_id)
        r = await api.get(routes.path(routes.ROLLOUT, rollout_id=rollout_id))
        status = r.json()
        assert status["counts"]["dispatched"] == 1
        assert [d["seq"] for d in status["devices"]] == [0, 1, 2]
        assert status["devices"][0]["state"] == "dispatched"
        r = await api.get(
            routes.path(routes.ROLLOUT, rollout_id=rollout_id),
            params={"state": "pending", "limit": 1, "offset": 1},
        )
        assert [d["state"] for d in r.json()["devices"]] == ["pending"]
        listed = (await api.get(routes.ROLLOUTS, params={"state": "running"})).json()
        assert [x["id"] for x in listed["rollouts"]] == [rollout_id]
        assert (await api.post(action(rollout_id, "pause"))).json()["state"] == "paused"
        r = await api.post(action(rollout_id, "pause"))
        assert r.status_code == 409
        assert "cannot pause a paused rollout" in r.text
        assert (await api.post(action(rollout_id, "resume"))).json()["state"] == "running"
        r = await api.post(action(rollout_id, "approve"))  # ahead of time: phase 2
        assert r.json()["approved"] == [1]
        r = await api.post(action(rollout_id, "pause"), json={"revert": True})
        assert r.status_code == 422
        r = await api.post(action(rollout_id, "abort"), json={"revert": True})
        assert (r.json()["state"], r.json()["revert"]) == ("aborted", True)
        r = await api.post(action("ro-0123abcd", "abort"))
        assert r.status_code == 404


async def test_scopes(rig: Rig, store: Store) -> None:
    add_devices(store, 1)
    async with in_process_api(
        store, routers=[make_router(rig.control)], scopes=("fleet:read",)
    ) as reader:
        assert (await reader.get(routes.ROLLOUTS)).status_code == 200
        r = await reader.post(routes.ROLLOUTS, json=PLAN)
        assert r.status_code == 403
        assert r.json()["scope"] == "rollouts:write"
        assert (await reader.post(action("ro-01", "pause"))).status_code == 403
    async with in_process_api(
        store, routers=[make_router(rig.control)], scopes=("rollouts:write",)
    ) as writer:
        assert (await writer.post(routes.ROLLOUTS, json=PLAN)).status_code == 201
        assert (await writer.get(routes.ROLLOUTS)).status_code == 403
    async with in_process_api(store, routers=[make_router(rig.control)], scopes=()) as anon:
        assert (await anon.get(routes.ROLLOUTS)).status_code == 401
        assert (await anon.post(routes.ROLLOUTS, json=PLAN)).status_code == 401
    assert len(rig.rollouts.list_rollouts()) == 1


HOSTILE: list[tuple[object, str]] = [
    ({}, "kind"),
    ([PLAN], "dictionary"),
    ("plan", "dictionary"),
    ({**PLAN, "kind": "firmware"}, "kind"),
    ({**PLAN, "name": "../../etc/passwd"}, "name"),
    ({**PLAN, "version": "1; drop table"}, "version"),
    ({**PLAN, "version": "0"}, "version"),
    ({**PLAN, "evil": 1}, "evil"),
    ({**PLAN, "phases": []}, "phases"),
    ({**PLAN, "phases": [{"count": 1}]}, "last phase"),
    ({**PLAN, "phases": [{"percent": 100}] * 21}, "phases"),
    ({**PLAN, "phases": [{"percent": 0}]}, "percent"),
    ({**PLAN, "phases": [{"percent": 100, "count": 3}]}, "count or a percent"),
    ({**PLAN, "phases": [{"count": -1}, {"percent": 100}]}, "count"),
    ({**PLAN, "max_in_flight": 0}, "max_in_flight"),
    ({**PLAN, "max_in_flight": 10**12}, "max_in_flight"),
    ({**PLAN, "success_threshold": 1.5}, "success_threshold"),
    ({**PLAN, "abort_failure_share": -0.1}, "abort_failure_share"),
    ({**PLAN, "device_timeout_s": 0}, "device_timeout_s"),
    ({**PLAN, "device_timeout_s": 1e12}, "device_timeout_s"),
    ({**PLAN, "offline": "maybe"}, "offline"),
    ({**PLAN, "selector": {"device_ids": ["a/../b"]}}, "device_ids"),
    ({**PLAN, "selector": {"device_ids": ["x"] * 10_001}}, "device_ids"),
    ({**PLAN, "selector": {"tag": "x" * 65}}, "tag"),
    ({**PLAN, "probe": {"source": "d", "max_accuracy_drop": 2}}, "max_accuracy_drop"),
    ({**PLAN, "kind": "agent", "probe": {"source": "d"}}, "version"),
    ({**PLAN, "selector": {"device_class": "ghost"}}, "no device matches"),
]


@pytest.mark.parametrize(("body", "why"), HOSTILE)
async def test_hostile_plans_are_refused_with_a_reason(
    rig: Rig, store: Store, body: object, why: str
) -> None:
    add_devices(store, 2)
    async with in_process_api(store, routers=[make_router(rig.control)]) as api:
        r = await api.post(routes.ROLLOUTS, json=body)
        assert r.status_code == 422, r.text
        assert why in r.text
        assert "passwd" not in r.text
    assert rig.rollouts.list_rollouts() == []
    assert store.tasks.list_tasks() == []


async def test_hostile_paths_queries_and_raw_bodies(rig: Rig, store: Store) -> None:
    add_devices(store, 1)
    async with in_process_api(store, routers=[make_router(rig.control)]) as api:
        for path, status in (
            ("/v1/rollouts/..%2F..%2Fetc", 404),  # no such route
            ("/v1/rollouts/" + "ro-" + "a" * 100, 422),
            ("/v1/rollouts/ro-abc?limit=100000", 422),
            ("/v1/rollouts/ro-abc?state=evil", 422),
            ("/v1/rollouts?offset=-1", 422),
        ):
            assert (await api.get(path)).status_code == status, path
        assert (await api.post("/v1/rollouts/ro-abc/explode")).status_code == 422
        deep = "[" * 10_000 + "]" * 10_000
        for raw in (
            b'{"kind": "model", "max_in_flight": NaN}',
            b"1e400",
            deep.encode(),
            b"\xff",
            b"{",
        ):
            r = await api.post(
                routes.ROLLOUTS, content=raw, headers={"content-type": "application/json"}
            )
            assert 400 <= r.status_code < 500, (raw[:20], r.status_code)
    assert rig.rollouts.list_rollouts() == []
