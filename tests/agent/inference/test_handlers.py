"""The deploy and infer handlers, called as the runner calls them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lepton.agent.handlers import TaskContext, TaskError, TaskServices, default_registry
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.runtimes.tflite import interpreter_module
from lepton.agent.inference.tasks import deploy, infer, predicted_labels
from lepton.agent.training.datasources import ArraySource, DataSources
from lepton.protocol.messages import Task
from tests.agent.inference.conftest import Linear, artifact
from tests.support.httpserver import Fault, HttpServer


def _task(kind: str, **params: Any) -> Task:
    return Task(task_id=f"t-{kind}", kind=kind, params=params, expires_at=time.time() + 60)


def _deploy_params(blobs: HttpServer, data: bytes, name: str = "clf", **extra: Any) -> dict:
    digest = blobs.add(data)
    return {
        "name": name,
        "digest": digest,
        "size": len(data),
        "url": blobs.url(digest),
        "format": "onnx",
        "precision": "fp32",
    } | extra


@pytest.fixture
def ctx(tmp_path: Path, manager: ModelManager, linear: Linear) -> TaskContext:
    np.savez(tmp_path / "val.npz", x=linear.x, y=linear.y)
    sources = DataSources({"val": str(tmp_path / "val.npz")})
    return TaskContext(
        device_id="dev",
        state_dir=tmp_path,
        agent_version="test",
        services=TaskServices(models=manager, data_sources=sources),
    )


def test_handlers_are_registered() -> None:
    registry = default_registry()
    assert registry.get("deploy") is deploy
    assert registry.get("infer") is infer


async def test_deploy_then_infer_reports_accuracy_and_latency(
    ctx: TaskContext, blobs: HttpServer, linear: Linear
) -> None:
    params = _deploy_params(blobs, linear.onnx)
    out = await deploy(_task("deploy", **params), ctx)
    assert out["name"] == "clf"
    assert out["digest"] == params["digest"]
    assert out["bytes_downloaded"] == len(linear.onnx)
    assert out["cached"] is False
    assert out["load_s"] > 0
    assert out["runtime"].startswith("onnxruntime")
    assert out["threads"] == 1
    assert out["previous_digest"] is None

    res = await infer(_task("infer", model="clf", source="val", batch_size=64), ctx)
    assert res["accuracy"] == 1.0
    assert res["correct"] == res["count"] == len(linear.x)
    assert res["batches"] == -(-len(linear.x) // 64)
    assert res["batch_size"] == 64
    assert res["digest"] == params["digest"]
    for scope in ("batch", "sample"):
        lat = res["latency_ms"][scope]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert res["latency_ms"]["sample"]["p50"] < res["latency_ms"]["batch"]["p50"]
    assert res["throughput_sps"] > 0
    assert res["threads"] == 1
    assert res["providers"] == ["CPUExecutionProvider"]

    limited = await infer(_task("infer", model="clf", source="val", limit=10, batch_size=3), ctx)
    assert limited["count"] == 10
    assert limited["batches"] == 4


async def test_redeploy_of_the_same_model_is_free(
    ctx: TaskContext, blobs: HttpServer, linear: Linear
) -> None:
    params = _deploy_params(blobs, linear.onnx)
    await deploy(_task("deploy", **params), ctx)
    again = await deploy(_task("deploy", **params), ctx)
    assert again["bytes_downloaded"] == 0
    assert again["cached"] is True


async def test_refused_deploy_is_a_task_error_with_the_reason(
    ctx: TaskContext, blobs: HttpServer, linear: Linear
) -> None:
    params = _deploy_params(blobs, linear.onnx)
    blobs.fault(params["digest"], Fault("wrong_bytes"))
    with pytest.raises(TaskError, match="digest_mismatch"):
        await deploy(_task("deploy", **params), ctx)
    with pytest.raises(TaskError, match="bad_url"):
        await deploy(_task("deploy", **{**params, "url": "file:///etc/passwd"}), ctx)


async def test_infer_refusals(ctx: TaskContext, blobs: HttpServer, linear: Linear) -> None:
    with pytest.raises(TaskError, match="unknown_model: model 'clf' is not deployed here"):
        await infer(_task("infer", model="clf", source="val"), ctx)
    await deploy(_task("deploy", **_deploy_params(blobs, linear.onnx)), ctx)
    with pytest.raises(TaskError, match="unknown data source 'nope'"):
        await infer(_task("infer", model="clf", source="nope"), ctx)
    with pytest.raises(TaskError, match="bad_params"):
        await infer(_task("infer", model="clf", source="val", batch_size=0), ctx)
    with pytest.raises(TaskError, match="no output 'probs'"):
        await infer(_task("infer", model="clf", source="val", output="probs"), ctx)


async def test_infer_adapts_samples_to_the_model(
    ctx: TaskContext, blobs: HttpServer, linear: Linear
) -> None:
    sources = ctx.services.data_sources
    assert sources is not None
    # 4x4 "images" for a 16-feature model, as float64, with one-hot labels.
    sources.add(
        "grid", ArraySource(linear.x.reshape(-1, 4, 4).astype(np.float64), np.eye(4)[linear.y])
    )
    sources.add("wrong", ArraySource(np.zeros((5, 3, 3))))
    sources.add("unlabelled", ArraySource(linear.x[:20]))
    await deploy(_task("deploy", **_deploy_params(blobs, linear.onnx)), ctx)
    res = await infer(_task("infer", model="clf", source="grid"), ctx)
    assert res["accuracy"] == 1.0
    with pytest.raises(
        TaskError, match=r"samples have shape \[3, 3\], model input 'x' wants \[16\] per sample"
    ):
        await infer(_task("infer", model="clf", source="wrong"), ctx)
    res = await infer(_task("infer", model="clf", source="unlabelled"), ctx)
    assert res["accuracy"] is None
    assert res["labelled"] is False
    assert res["count"] == 20


async def test_declared_normalisation_is_applied(
    ctx: TaskContext, blobs: HttpServer, linear: Linear
) -> None:
    sources = ctx.services.data_sources
    assert sources is not None
    # Raw data = 10 * x + 5; the deploy declares how to undo it.
    sources.add("raw", ArraySource(linear.x * 10 + 5, linear.y))
    params = _deploy_params(blobs, linear.onnx, input={"mean": 5.0, "std": 10.0})
    await deploy(_task("deploy", **params), ctx)
    res = await infer(_task("infer", model="clf", source="raw"), ctx)
    assert res["accuracy"] == 1.0


def test_predicted_labels() -> None:
    assert predicted_labels(np.array([[0.1, 0.9], [0.8, 0.2]])).tolist() == [1, 0]
    assert predicted_labels(np.array([3, 1], dtype=np.int64)).tolist() == [3, 1]
    assert predicted_labels(np.array([[0.7], [0.2]], dtype=np.float32)).tolist() == [1, 0]


async def test_layouts_are_never_silently_reinterpreted(
    ctx: TaskContext, blobs: HttpServer, linear: Linear
) -> None:
    sources = ctx.services.data_sources
    assert sources is not None
    # 16 features as 2x8 would "fit" by size, but it is not a flattening: refused.
    sources.add("two_by_eight", ArraySource(linear.x.reshape(-1, 2, 8)))
    sources.add("column", ArraySource(linear.x.reshape(-1, 16, 1), linear.y))
    await deploy(_task("deploy", **_deploy_params(blobs, linear.onnx)), ctx)
    res = await infer(_task("infer", model="clf", source="column"), ctx)
    assert res["accuracy"] == 1.0  # a trailing axis of 1 is dropped
    res = await infer(_task("infer", model="clf", source="two_by_eight"), ctx)
    assert res["count"] == len(linear.x)  # flattening a 2x8 sample into 16 is a flattening


@pytest.mark.parametrize(
    ("artifact_name", "fmt"),
    [("digits_int8.onnx", "onnx"), ("digits_int8.tflite", "tflite")],
)
async def test_shipped_int8_digits_model_accuracy(
    tmp_path: Path, manager: ModelManager, blobs: HttpServer, artifact_name: str, fmt: str
) -> None:
    model_path = artifact(artifact_name)
    test_set = artifact("digits_test.npz")
    if fmt == "tflite" and interpreter_module() is None:
        pytest.skip("no TFLite interpreter (pip install ai-edge-litert)")
    ctx = TaskContext(
        device_id="dev",
        state_dir=tmp_path,
        agent_version="test",
        services=TaskServices(models=manager, data_sources=DataSources({"digits": str(test_set)})),
    )
    params = _deploy_params(blobs, model_path.read_bytes(), name="digits", format=fmt)
    params["precision"] = "int8"
    out = await deploy(_task("deploy", **params), ctx)
    assert out["precision"] == "int8"
    res = await infer(_task("infer", model="digits", source="digits", batch_size=64), ctx)
    assert res["count"] == 450
    assert res["accuracy"] > 0.95
