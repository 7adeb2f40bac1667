"""Deploying a registered model: one pinned ``deploy`` task per chosen device, through the
normal task path, with params the agent's deploy handler accepts; and the HTTP route's answer
to hostile input (nothing is submitted for a refused request)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lepton.agent.inference.served import deploy_spec
from lepton.coordinator.config import load as load_config
from lepton.coordinator.errors import NotFoundError
from lepton.coordinator.model_registry.deploy import (
    Deployer,
    DeployError,
    DeviceSelector,
    deploy_params,
    resolve_model,
)
from lepton.coordinator.model_registry.registry import ModelRecord, ModelRegistry
from lepton.coordinator.model_registry.routes import make_router
from lepton.coordinator.store import Store
from lepton.protocol.messages import State
from lepton.protocol.tasks import DEPLOY, encode_params
from tests.coordinator.conftest import in_process_api
from tests.coordinator.factories import sample

BASE = "http://coordinator.example:8080"


@pytest.fixture
def models(store: Store, tmp_path: Path, digits_fp32: Path) -> ModelRegistry:
    """v1: the digits ONNX model; v2: a torch checkpoint (not servable by a device)."""
    registry = ModelRegistry(store.engine, tmp_path / "data")
    registry.import_file(digits_fp32, name="digits", format="onnx", precision="fp32")
    registry.import_bytes(b"\x00" * 64, name="digits", format="torch", precision="fp32")
    return registry


@pytest.fixture
def fleet(store: Store) -> Store:
    """a: rpi5 lab, b: rpi4 lab, c: rpi5, d: rpi5 lab but offline."""
    now = time.time()
    store.devices.record_capacity(
        [
            sample("a", device_class="rpi5", tags=["lab"]),
            sample("b", device_class="rpi4", tags=["lab"]),
            sample("c", device_class="rpi5"),
            sample("d", device_class="rpi5", tags=["lab"]),
        ]
    )
    store.devices.apply_state("d", "default", State(state="offline"), now + 1)
    assert {d.id for d in store.devices.list_devices(state="online")} == {"a", "b", "c"}
    return store


@pytest.fixture
def deployer(fleet: Store, models: ModelRegistry) -> Deployer:
    return Deployer(load_config(env={}), fleet.devices, fleet.tasks, models, lambda: BASE)


def chosen(deployer: Deployer, **selector: object) -> list[str | None]:
    done = deployer.deploy("digits", None, DeviceSelector(**selector))  # type: ignore[arg-type]
    return [t.pinned_device for t in done.tasks]


def test_one_pinned_task_per_chosen_device(deployer: Deployer, fleet: Store) -> None:
    done = deployer.deploy("digits", 1, DeviceSelector(device_class="rpi5", tag="lab"))
    assert done.model.version == 1
    assert [t.pinned_device for t in done.tasks] == ["a"]
    task = fleet.tasks.get_task(done.tasks[0].id)
    assert (task.kind, task.state, task.input_bytes) == ("deploy", "pending", done.model.size)
    assert task.params == encode_params(DEPLOY, deploy_params(done.model, BASE))
    assert task.params["url"] == f"{BASE}/v1/blobs/{done.model.digest}"


def test_selection(deployer: Deployer) -> None:
    assert chosen(deployer) == ["a", "b", "c"]  # every online device
    assert chosen(deployer, device_class="rpi5") == ["a", "c"]
    assert chosen(deployer, tag="lab") == ["a", "b"]
    # Named devices are taken whatever their state (their tasks wait for them).
    assert chosen(deployer, device_ids=("d", "a", "d")) == ["a", "d"]
    assert chosen(deployer, device_ids=("a", "b"), device_class="rpi4") == ["b"]
    with pytest.raises(DeployError, match="no device matches class rpi4 and tag gpu"):
        chosen(deployer, device_class="rpi4", tag="gpu")
    with pytest.raises(NotFoundError):
        chosen(deployer, device_ids=("a", "ghost"))


def test_the_version_must_be_servable(models: ModelRegistry) -> None:
    assert resolve_model(models, "digits").version == 1  # v2 is a torch checkpoint
    with pytest.raises(DeployError, match="torch"):
        resolve_model(models, "digits", 2)
    with pytest.raises(NotFoundError):
        resolve_model(models, "digits", precision="int8")
    with pytest.raises(NotFoundError):
        resolve_model(models, "digits", 1, precision="int8")
    with pytest.raises(NotFoundError):
        resolve_model(models, "ghost")


def test_the_agent_accepts_the_params(models: ModelRegistry) -> None:
    record: ModelRecord = resolve_model(models, "digits")
    params = encode_params(DEPLOY, deploy_params(record, BASE + "/"))
    spec = deploy_spec(params, max_bytes=1 << 30)
    assert (spec.name, spec.digest, spec.size, spec.format) == (
        "digits",
        record.digest,
        record.size,
        "onnx",
    )
    assert spec.url == f"{BASE}/v1/blobs/{record.digest}"


async def test_the_route_deploys(deployer: Deployer, fleet: Store, models: ModelRegistry) -> None:
    async with in_process_api(fleet, routers=[make_router(models, deployer)]) as api:
        r = await api.post("/v1/models/digits/deploy", json={"tag": "lab", "max_attempts": 2})
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["model"]["version"] == 1
        assert [(t["pinned_device"], t["kind"]) for t in body["tasks"]] == [
            ("a", "deploy"),
            ("b", "deploy"),
        ]
        assert {fleet.tasks.get_task(t["id"]).max_attempts for t in body["tasks"]} == {2}


HOSTILE = [
    ("/v1/models/digits/deploy", {"version": 0}, 422),
    ("/v1/models/digits/deploy", {"version": -1}, 422),
    ("/v1/models/digits/deploy", {"version": 2**40}, 422),
    ("/v1/models/digits/deploy", {"version": "1; drop table"}, 422),
    ("/v1/models/digits/deploy", {"precision": "int4"}, 422),
    ("/v1/models/digits/deploy", {"device_class": "x" * 65}, 422),
    ("/v1/models/digits/deploy", {"tag": "a b"}, 422),
    ("/v1/models/digits/deploy", {"device_ids": ["../../etc/passwd"]}, 422),
    ("/v1/models/digits/deploy", {"device_ids": "a"}, 422),
    ("/v1/models/digits/deploy", {"device_ids": [{"$ne": None}]}, 422),
    ("/v1/models/digits/deploy", {"device_ids": [f"d{i}" for i in range(10_001)]}, 422),
    ("/v1/models/digits/deploy", {"expires_in_s": -5}, 422),
    ("/v1/models/digits/deploy", {"max_attempts": 10**9}, 422),
    ("/v1/models/digits/deploy", {"url": "http://evil.example/x"}, 422),  # no such field
    ("/v1/models/digits/deploy", [1, 2, 3], 422),
    ("/v1/models/digits/deploy", {"version": 2}, 422),  # torch: not servable
    ("/v1/models/digits/deploy", {"version": 9}, 404),
    ("/v1/models/digits/deploy", {"device_ids": ["ghost"]}, 404),
    ("/v1/models/digits/deploy", {"device_class": "toaster"}, 422),  # no device matches
    ("/v1/models/ghost/deploy", {}, 404),
    ("/v1/models/..%2F..%2Fetc/deploy", {}, 404),  # no such route
    ("/v1/models/" + "n" * 200 + "/deploy", {}, 422),
]


@pytest.mark.parametrize(("path", "body", "status"), HOSTILE)
async def test_hostile_deploy_requests_are_refused(
    deployer: Deployer,
    fleet: Store,
    models: ModelRegistry,
    path: str,
    body: object,
    status: int,
) -> None:
    async with in_process_api(fleet, routers=[make_router(models, deployer)]) as api:
        r = await api.post(path, json=body)
        assert r.status_code == status, r.text
        # Input is not echoed back.
        assert "evil" not in r.text
        assert "passwd" not in r.text
        assert fleet.tasks.list_tasks() == []


async def test_a_deep_or_not_finite_body_is_refused(
    deployer: Deployer, fleet: Store, models: ModelRegistry
) -> None:
    async with in_process_api(fleet, routers=[make_router(models, deployer)]) as api:
        deep = "[" * 10_000 + "]" * 10_000
        for raw in (
            b'{"expires_in_s": NaN}',
            b'{"expires_in_s": 1e400}',
            deep.encode(),
            b"\xff\xfe",
            b"{",
        ):
            r = await api.post(
                "/v1/models/digits/deploy",
                content=raw,
                headers={"content-type": "application/json"},
            )
            assert 400 <= r.status_code < 500, (raw[:20], r.status_code)
        assert fleet.tasks.list_tasks() == []
