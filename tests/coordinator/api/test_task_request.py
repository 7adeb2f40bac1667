"""One task request type: the API body (TaskSubmit) has TaskRequest's fields, defaults and
bounds; the CLI's body is a TaskRequest's; params of a known kind are checked against its
struct at submission (a 422 naming the field), others pass as they are; a task comes back as
TaskOut from the stored record."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from lepton.coordinator.api.schemas import TaskOut, TaskSubmit
from lepton.coordinator.metrics import Metrics
from lepton.coordinator.store import RetryPolicy, Store
from lepton.coordinator.tasks.request import TaskRequest
from lepton.protocol.tasks import INFER, InferParams, encode_params
from tests.coordinator.conftest import in_process_api


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(
        f"sqlite:///{tmp_path / 'api.db'}", retry=RetryPolicy(), sqlite_synchronous="normal"
    )


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process_api(store, Metrics(), overrides={"fleet": "default"}) as client:
        yield client


BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength")


def _plain(prop: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema property without its optional wrapper, as one dict of its bounds."""
    if "anyOf" in prop:
        (prop,) = [p for p in prop["anyOf"] if p.get("type") != "null"]
    out = {k: prop[k] for k in BOUNDS if k in prop}
    if "pattern" in prop:
        out["pattern"] = prop["pattern"]
    if "enum" in prop:
        out["enum"] = sorted(prop["enum"])
    if "const" in prop:
        out["enum"] = [prop["const"]]
    return out


def test_the_api_body_is_the_task_request() -> None:
    fields = {f.name: f for f in msgspec.structs.fields(TaskRequest)}
    model = TaskSubmit.model_fields
    assert list(model) == list(fields)
    for name, f in fields.items():
        assert model[name].is_required() == f.required, name
        if not f.required:
            want = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
            assert model[name].get_default(call_default_factory=True) == want, name
    (_, components) = msgspec.json.schema_components([TaskRequest])
    ours = components["TaskRequest"]["properties"]
    theirs = TaskSubmit.model_json_schema()["properties"]
    for name in fields:
        assert _plain(ours[name]) == _plain(theirs[name]), name


def test_a_submit_body_becomes_the_request_it_holds() -> None:
    body = {"kind": "echo", "params": {"payload": 1}, "min_battery": 20.0, "device_id": "d1"}
    request = TaskSubmit.model_validate(body).request()
    assert request == msgspec.convert(body, TaskRequest)
    assert request.body() == body


def test_the_cli_posts_a_task_request() -> None:
    from lepton.coordinator.cli.main import _submission

    args = argparse.Namespace(
        kind="infer",
        params_json='{"model": "clf"}',
        param=["source=val", "batch_size=8"],
        task_id=None,
        demand=2.5,
        model_class=None,
        precision="int8",
        runtime=None,
        accelerator=None,
        memory=None,
        device="dev-1",
        max_attempts=None,
        expires_in=None,
    )
    request = _submission(args)
    assert request == TaskRequest(
        kind=INFER,
        params={"model": "clf", "source": "val", "batch_size": 8},
        demand_gops=2.5,
        precision="int8",
        device_id="dev-1",
    )
    assert request.body() == {
        "kind": "infer",
        "params": {"model": "clf", "source": "val", "batch_size": 8},
        "demand_gops": 2.5,
        "precision": "int8",
        "device_id": "dev-1",
    }


async def test_params_of_a_known_kind_are_checked_at_submission(
    api: httpx.AsyncClient, store: Store
) -> None:
    bad = {"kind": "infer", "params": {"model": "clf", "source": "val", "batch_size": 0}}
    r = await api.post("/v1/tasks", json=bad)
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "params", "batch_size"]
    missing = {"kind": "train", "params": {"job": "j"}}
    r = await api.post("/v1/tasks", json=missing)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["body", "params", "round"]
    assert store.tasks.count_tasks().get("pending", 0) == 0

    good = encode_params(INFER, InferParams(model="clf", source="val", batch_size=8))
    r = await api.post("/v1/tasks", json={"kind": "infer", "params": {**good, "extra": 1}})
    assert r.status_code == 201, r.text
    assert r.json()["params"] == {**good, "extra": 1}  # stored as given
    # A kind without a contract (a plugin's) is not checked.
    r = await api.post("/v1/tasks", json={"kind": "plugin.thing", "params": {"batch_size": 0}})
    assert r.status_code == 201, r.text


async def test_a_task_comes_back_as_its_record(api: httpx.AsyncClient, store: Store) -> None:
    r = await api.post("/v1/tasks", json={"kind": "echo", "min_battery": 30})
    assert r.status_code == 201, r.text
    record = store.tasks.get_task(r.json()["id"])
    out = TaskOut.of(record)
    for name in TaskOut.model_fields:
        if name != "next_attempt_at":
            assert getattr(out, name) == getattr(record, name), name
    assert out.next_attempt_at == record.next_attempt_at  # pending: its next attempt shows
    assert r.json() == out.model_dump(mode="json")


def test_every_request_field_reaches_the_stored_task() -> None:
    from lepton.coordinator.tasks.submit import COPIED

    mapped = {"id", "kind", "params", "max_attempts", "device_id", "expires_in_s"}
    assert set(COPIED) | mapped == set(TaskRequest.__struct_fields__)
