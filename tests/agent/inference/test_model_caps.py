"""Finding 9 of the hardening review: every deploy under a new name was loaded and kept, on
disk and in memory. The model manager now stays within its caps, unloading the least
recently used model, and ``undeploy`` removes one. Against a real HTTP server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from lepton.agent.handlers import TaskContext, TaskError, TaskServices, default_registry
from lepton.agent.inference.eviction import Caps, Loaded, cache_excess, to_evict
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.served import ModelError
from lepton.agent.inference.tasks import deploy, undeploy
from lepton.protocol.messages import Task
from tests.agent.inference.conftest import Linear, make_linear, spec_for
from tests.support.httpserver import HttpServer

MODELS = [make_linear(seed) for seed in range(10, 15)]


def _manager(tmp_path: Path, **caps: int) -> ModelManager:
    return ModelManager(tmp_path / "models", threads=1, caps=Caps(**caps))


def _index(manager: ModelManager) -> set[str]:
    return set(json.loads((manager.root / "index.json").read_text())["models"])


def _predict(manager: ModelManager, name: str, model: Linear) -> None:
    with manager.lease(name) as served:
        assert served is not None
        out = served.runtime.run({"x": model.x[:2]})["logits"]
    np.testing.assert_allclose(out, model.logits(model.x[:2]), atol=1e-5)


def _cached(manager: ModelManager) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in manager.cache_dir.iterdir()}


async def test_past_the_count_cap_the_least_recently_used_model_goes(
    tmp_path: Path, blobs: HttpServer
) -> None:
    manager = _manager(tmp_path, max_models=2)
    a, b, c = (spec_for(blobs, m.onnx, name=n) for m, n in zip(MODELS, "abc", strict=False))
    await manager.deploy(a)
    await manager.deploy(b)
    _predict(manager, "a", MODELS[0])  # a is now more recently used than b
    outcome = await manager.deploy(c)
    assert outcome.evicted == ("b",)
    assert [m.name for m in manager.served()] == ["a", "c"]
    assert _index(manager) == {"a", "c"}
    assert manager.evictions == 1
    _predict(manager, "c", MODELS[2])


async def test_a_model_in_use_is_not_evicted_under_its_request(
    tmp_path: Path, blobs: HttpServer
) -> None:
    manager = _manager(tmp_path, max_models=2)
    specs = [spec_for(blobs, m.onnx, name=n) for m, n in zip(MODELS, "abc", strict=False)]
    await manager.deploy(specs[0])
    await manager.deploy(specs[1])
    with manager.lease("a") as held:  # a request holds a, the least recently used
        assert held is not None
        held.last_used = 0.0
        outcome = await manager.deploy(specs[2])
        assert outcome.evicted == ("b",)
        out = held.runtime.run({"x": MODELS[0].x[:2]})["logits"]  # still usable
        np.testing.assert_allclose(out, MODELS[0].logits(MODELS[0].x[:2]), atol=1e-5)


async def test_byte_caps_bound_memory_and_disk(tmp_path: Path, blobs: HttpServer) -> None:
    size = len(MODELS[0].onnx)
    manager = _manager(
        tmp_path, max_models=10, max_loaded_bytes=3 * size + 10, max_cache_bytes=4 * size + 10
    )
    for i, model in enumerate(MODELS):  # five models, all the same size
        await manager.deploy(spec_for(blobs, model.onnx, name=f"m{i}"))
        loaded = sum(m.size for m in manager.served())
        assert loaded <= manager.caps.max_loaded_bytes
        assert sum(_cached(manager).values()) <= manager.caps.max_cache_bytes
    assert [m.name for m in manager.served()] == ["m2", "m3", "m4"]
    # One unloaded model stays cached (room for one spare), the older ones are gone.
    assert len(_cached(manager)) == 4
    with pytest.raises(ModelError, match="exceeds this device's model caps"):
        await manager.deploy(spec_for(blobs, make_linear(20, n_in=512).onnx, name="huge"))


async def test_undeploy_unloads_and_removes_after_requests_in_flight(
    tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    manager = _manager(tmp_path)
    spec = spec_for(blobs, linear.onnx, name="clf")
    await manager.deploy(spec)
    with manager.lease("clf") as held:
        assert held is not None
        out = await manager.undeploy("clf")
        assert out == {"name": "clf", "digest": spec.digest, "removed_bytes": spec.size}
        assert manager.get("clf") is None
        # The request in flight finishes on the model it holds.
        np.testing.assert_allclose(
            held.runtime.run({"x": linear.x[:2]})["logits"], linear.logits(linear.x[:2]), atol=1e-5
        )
    assert not manager.cached_path(spec.digest).exists()
    assert _index(manager) == set()
    with pytest.raises(ModelError, match="unknown_model"):
        await manager.undeploy("clf")
    # After a restart it stays gone.
    again = _manager(tmp_path)
    await again.restore()
    assert again.served() == []


async def test_undeploy_is_a_task_kind(tmp_path: Path, blobs: HttpServer, linear: Linear) -> None:
    manager = _manager(tmp_path)
    ctx = TaskContext(
        device_id="dev",
        state_dir=tmp_path,
        agent_version="t",
        services=TaskServices(models=manager),
    )
    assert default_registry().get("undeploy") is undeploy
    spec = spec_for(blobs, linear.onnx, name="clf")
    params = {"name": "clf", "digest": spec.digest, "size": spec.size, "url": spec.url}
    await deploy(_task("deploy", **params, format="onnx"), ctx)
    out = await undeploy(_task("undeploy", name="clf"), ctx)
    assert out["removed_bytes"] == spec.size
    with pytest.raises(TaskError, match="unknown_model"):
        await undeploy(_task("undeploy", name="clf"), ctx)
    with pytest.raises(TaskError, match="bad_params"):
        await undeploy(_task("undeploy", name="../etc"), ctx)


async def test_a_restart_with_smaller_caps_unloads_the_least_recent(
    tmp_path: Path, blobs: HttpServer
) -> None:
    first = _manager(tmp_path, max_models=3)
    for model, name in zip(MODELS, "abc", strict=False):
        await first.deploy(spec_for(blobs, model.onnx, name=name))
    first.close()
    second = _manager(tmp_path, max_models=1)
    await second.restore()
    assert len(second.served()) == 1
    assert len(_index(second)) == 1


def test_policy_prefers_the_least_recent_and_spares_the_protected_and_busy() -> None:
    caps = Caps(max_models=2)
    models = [
        Loaded("old", "d1", 10, 1.0, in_use=False),
        Loaded("busy", "d2", 10, 0.5, in_use=True),
        Loaded("new", "d3", 10, 3.0, in_use=False),
        Loaded("mid", "d4", 10, 2.0, in_use=False),
    ]
    assert to_evict(models, caps, protect="new") == ["old", "mid"]
    assert to_evict(models, caps, protect="mid") == ["old", "new"]
    # Only busy and protected left over the cap: nothing more can go.
    assert to_evict(models[1:3], Caps(max_models=1), protect="new") == []
    files = [("a", 10, 1.0), ("b", 10, 2.0), ("c", 10, 3.0), ("s", 10, 0.0)]
    assert cache_excess(files, {"s"}, Caps(max_cache_bytes=100), spare=2) == ["a"]
    assert cache_excess(files, {"s"}, Caps(max_cache_bytes=25), spare=2) == ["a", "b"]


def _task(kind: str, **params: object) -> Task:
    return Task(task_id=f"t-{kind}", kind=kind, params=params, expires_at=time.time() + 60)
