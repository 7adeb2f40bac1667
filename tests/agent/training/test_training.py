"""The train and evaluate handlers end to end against real HTTP servers."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pytest

from lepton.agent.credentials import CoordinatorCredentials
from lepton.agent.handlers import TaskContext, TaskError, default_registry
from lepton.agent.inference.manager import ModelManager
from lepton.agent.training.tasks import evaluate, train
from lepton.protocol.tasks import Compression
from lepton.protocol.weights import COMPRESSIONS, decode_weights
from tests.agent.training.conftest import (
    ALLOWED,
    CNN,
    MLP,
    Partition,
    Servers,
    initial_weights,
    task,
    train_params,
)
from tests.support.httpserver import Fault


def local_loss(factory: str, weights: dict[str, np.ndarray], partition: Partition) -> float:
    import torch
    from torch.nn import functional

    from lepton.agent.training.trainer import build_model

    model = build_model(factory, weights, allow=ALLOWED)
    model.eval()
    with torch.no_grad():
        out = model(torch.from_numpy(partition.x))
        return float(functional.cross_entropy(out, torch.from_numpy(partition.y)))


async def run_train(ctx: TaskContext, servers: Servers, **overrides: object) -> tuple[dict, dict]:
    """Run a train task; its output and the decoded update that was uploaded."""
    params = train_params(servers, **overrides)  # type: ignore[arg-type]
    out = await train(task("train", **params), ctx)
    body = servers.uploads.body(params["upload"]["url"])
    meta, delta = decode_weights(body, max_bytes=1 << 24)
    assert meta.base == params["weights"]["digest"]
    return out, {"meta": meta, "delta": delta, "body": body, "params": params}


def test_handlers_are_registered() -> None:
    registry = default_registry()
    assert registry.get("train") is train
    assert registry.get("evaluate") is evaluate
    assert {"echo", "deploy", "infer"} <= set(registry.kinds())


def test_registering_loads_neither_numpy_nor_torch() -> None:
    code = (
        "import sys; from lepton.agent.handlers import default_registry; default_registry(); "
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_compression_choices_match_the_wire_format() -> None:
    assert typing.get_args(Compression) == COMPRESSIONS


async def test_train_uploads_an_update_that_lowers_the_loss(
    ctx: TaskContext, servers: Servers, partition: Partition
) -> None:
    out, up = await run_train(ctx, servers)
    body, meta, delta = up["body"], up["meta"], up["delta"]

    digest = hashlib.sha256(body).hexdigest()
    assert out["update"] == {"digest": digest, "size": len(body), "compression": "fp32"}
    (put,) = servers.uploads.requests
    assert put.status == 201
    assert put.headers["X-Lepton-Digest"] == f"sha256:{digest}"
    assert put.headers["Content-Length"] == str(len(body))
    assert (meta.kind, meta.round, meta.job, meta.compression) == ("update", 3, "digits-fl", "fp32")

    global_w = initial_weights(CNN)
    assert list(delta) == list(global_w)
    assert all(delta[k].shape == global_w[k].shape for k in global_w)

    assert out["examples"] == len(partition.x)
    assert out["steps"] == 2 * -(-len(partition.x) // 32)
    assert out["loss_after"] < out["loss_before"]
    assert 0.0 <= out["accuracy_before"] < out["accuracy"] <= 1.0
    assert out["train_s"] > 0
    assert out["upload_s"] > 0
    assert out["weights_cached"] is False
    assert (out["job"], out["round"]) == ("digits-fl", 3)

    before = local_loss(CNN, global_w, partition)
    after = local_loss(CNN, {k: global_w[k] + delta[k] for k in global_w}, partition)
    assert before == pytest.approx(out["loss_before"], rel=1e-4)
    assert after == pytest.approx(out["loss_after"], rel=1e-3)
    assert after < before
    norm = float(np.sqrt(sum(np.sum(d.astype(np.float64) ** 2) for d in delta.values())))
    assert norm == pytest.approx(out["update_norm"], rel=1e-5)


async def test_compressed_updates_are_smaller(ctx: TaskContext, servers: Servers) -> None:
    sizes, deltas = {}, {}
    for compression in ("fp32", "fp16", "int8"):
        url = servers.uploads.upload_url(f"mlp/{compression}")
        out, up = await run_train(
            ctx, servers, model=MLP, epochs=1, compression=compression, upload={"url": url}
        )
        assert up["meta"].compression == compression
        sizes[compression] = out["update"]["size"]
        deltas[compression] = up["delta"]
    assert sizes["int8"] <= 0.27 * sizes["fp32"]
    assert 0.45 <= sizes["fp16"] / sizes["fp32"] <= 0.55
    # Same seed, same training: the compressed updates approximate the exact one.
    for compression, tol in (("fp16", 1e-3), ("int8", 2e-2)):
        for name, exact in deltas["fp32"].items():
            err = np.abs(deltas[compression][name] - exact).max()
            assert err <= tol * max(1e-6, float(np.abs(exact).max())) + 1e-6, (compression, name)


async def test_fedprox_term_keeps_the_update_closer(ctx: TaskContext, servers: Servers) -> None:
    free, _ = await run_train(
        ctx, servers, prox_mu=0.0, upload={"url": servers.uploads.upload_url("a")}
    )
    prox, _ = await run_train(
        ctx, servers, prox_mu=5.0, upload={"url": servers.uploads.upload_url("b")}
    )
    assert prox["update_norm"] < 0.9 * free["update_norm"]
    assert prox["examples"] == free["examples"]


async def test_same_seed_same_update(ctx: TaskContext, servers: Servers) -> None:
    one, _ = await run_train(
        ctx, servers, epochs=1, upload={"url": servers.uploads.upload_url("1")}
    )
    two, _ = await run_train(
        ctx, servers, epochs=1, upload={"url": servers.uploads.upload_url("2")}
    )
    three, _ = await run_train(
        ctx, servers, epochs=1, seed=2, upload={"url": servers.uploads.upload_url("3")}
    )
    assert one["update"]["digest"] == two["update"]["digest"]
    assert three["update"]["digest"] != one["update"]["digest"]
    assert two["weights_cached"] is True  # fetched once, then served from the cache


async def test_adam_max_examples_and_buffers(
    ctx: TaskContext, servers: Servers, partition: Partition
) -> None:
    sources = ctx.services.data_sources
    assert sources is not None
    assert "digits" not in sources.sizes()
    out, up = await run_train(
        ctx,
        servers,
        model="tests.agent.training.nets:with_batchnorm",
        optimizer="adam",
        lr=0.01,
        max_examples=100,
        compression="int8",
    )
    assert out["examples"] == 100
    # The source's size is learned from the load, whole although the task read 100.
    assert sources.sizes() == {"digits": len(partition.y)} != {"digits": 100}
    assert out["loss_after"] < out["loss_before"]
    counter = up["delta"]["2.num_batches_tracked"]
    assert counter.dtype == np.int64
    assert int(counter) == out["steps"]


async def test_upload_is_retried(ctx: TaskContext, servers: Servers) -> None:
    servers.uploads.fault_puts(Fault(kind="status", status=503))
    servers.uploads.fault_puts(Fault(kind="drop"))
    out, up = await run_train(ctx, servers, epochs=1)
    statuses = [r.status for r in servers.uploads.requests]
    assert statuses == [503, 0, 201]
    assert out["update"]["size"] == len(up["body"])


async def test_upload_refused_fails_the_task(ctx: TaskContext, servers: Servers) -> None:
    servers.uploads.fault_puts(Fault(kind="status", status=403))
    with pytest.raises(TaskError, match=r"upload_refused.*403"):
        await train(task("train", **train_params(servers, epochs=1)), ctx)
    assert len(servers.uploads.requests) == 1


async def test_upload_gives_up_after_the_retries(ctx: TaskContext, servers: Servers) -> None:
    servers.uploads.fault_puts(Fault(kind="status", status=500, times=10))
    with pytest.raises(TaskError, match=r"upload_failed.*gave up after 4"):
        await train(task("train", **train_params(servers, epochs=1)), ctx)


async def test_device_without_the_data_source_refuses_before_downloading(
    ctx: TaskContext, servers: Servers
) -> None:
    params = train_params(servers, data="xray")
    with pytest.raises(
        TaskError, match=r"no_data: this device has no data source 'xray' \(it has: digits"
    ):
        await train(task("train", **params), ctx)
    with pytest.raises(TaskError, match="no_labels"):
        await train(task("train", **train_params(servers, data="unlabelled")), ctx)
    assert servers.blobs.requests == []
    assert servers.uploads.requests == []


async def test_weights_are_verified_by_digest(ctx: TaskContext, servers: Servers) -> None:
    params = train_params(servers)
    servers.blobs.fault(params["weights"]["digest"], Fault("wrong_bytes", times=-1))
    with pytest.raises(TaskError, match="digest_mismatch"):
        await train(task("train", **params), ctx)
    assert servers.uploads.requests == []


async def test_resumes_an_interrupted_weights_download(ctx: TaskContext, servers: Servers) -> None:
    params = train_params(servers, epochs=1)
    servers.blobs.fault(params["weights"]["digest"], Fault("drop", at=5000))
    out = await train(task("train", **params), ctx)
    ranges = [r.range for r in servers.blobs.requests]
    assert ranges == [None, "bytes=5000-"]
    assert out["loss_after"] < out["loss_before"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": MLP}, "weights_mismatch"),
        ({"model": "tests.agent.training.nets:not_a_module"}, "not a torch.nn.Module"),
        ({"model": "no.such.module:Net"}, "cannot import"),
        ({"model": "tests.agent.training.nets:nothing"}, "not found"),
        ({"model": "not a path"}, "bad_params"),
        ({"compression": "zip"}, "bad_params"),
        ({"epochs": 0}, "bad_params"),
        ({"upload": {"url": "ftp://x/y"}}, "upload.url must be an http"),
    ],
)
async def test_bad_tasks_fail_with_a_reason(
    ctx: TaskContext, servers: Servers, overrides: dict, message: str
) -> None:
    params = train_params(servers)  # weights of the CNN
    params.update(overrides)
    with pytest.raises(TaskError, match=message):
        await train(task("train", **params), ctx)
    assert servers.uploads.requests == []


@pytest.mark.parametrize("kind", ["train", "evaluate"])
@pytest.mark.parametrize("model", ["os:abort", "subprocess:run", "shutil:rmtree"])
async def test_a_model_outside_the_allowlist_is_refused_before_anything_is_loaded(
    ctx: TaskContext, servers: Servers, kind: str, model: str
) -> None:
    """Finding 2 of the hardening review: ``os:abort`` as a model killed the agent (here it
    would end the test process)."""
    params = {**train_params(servers), "model": model}  # the CNN's weights, a hostile model
    if kind == "evaluate":
        params = {k: params[k] for k in ("model", "weights", "data")}
    with pytest.raises(
        TaskError, match=r"model: .* is not in the allowed imports \(lepton\.models\.\*"
    ):
        await (train if kind == "train" else evaluate)(task(kind, **params), ctx)
    assert servers.blobs.requests == []  # refused before the weights were fetched
    assert servers.uploads.requests == []


async def test_a_diverging_model_fails_instead_of_uploading(
    ctx: TaskContext, servers: Servers
) -> None:
    params = train_params(servers, model="tests.agent.training.nets:nan_net")
    with pytest.raises(TaskError, match="diverged"):
        await train(task("train", **params), ctx)
    assert servers.uploads.requests == []


async def test_missing_params_name_the_field(ctx: TaskContext, servers: Servers) -> None:
    params = train_params(servers)
    del params["upload"]
    with pytest.raises(TaskError, match=r"bad_params.*upload"):
        await train(task("train", **params), ctx)


async def test_evaluate_scores_the_weights_on_local_data(
    ctx: TaskContext, servers: Servers, partition: Partition
) -> None:
    weights = servers.weights(CNN)
    out = await evaluate(
        task("evaluate", model=CNN, weights=weights, data="digits", job="j", round=2), ctx
    )
    assert out["examples"] == len(partition.x)
    assert out["loss"] == pytest.approx(local_loss(CNN, initial_weights(CNN), partition), rel=1e-4)
    assert 0.0 <= out["accuracy"] <= 1.0
    assert (out["job"], out["round"]) == ("j", 2)
    limited = await evaluate(
        task("evaluate", model=CNN, weights=weights, data="digits", max_examples=10), ctx
    )
    assert limited["examples"] == 10
    with pytest.raises(TaskError, match="no data source 'nope'"):
        await evaluate(task("evaluate", model=CNN, weights=weights, data="nope"), ctx)


def test_optimizers_follow_torch_update_rules() -> None:
    import msgspec
    import torch

    from lepton.agent.training.trainer import Optimizer
    from lepton.protocol.tasks import TrainParams

    def params(**kw: object) -> TrainParams:
        base = {
            "job": "j",
            "round": 0,
            "model": "m:f",
            "weights": {"digest": "0" * 64, "size": 1, "url": "http://x"},
            "data": "d",
            "upload": {"url": "http://x"},
        }
        return msgspec.convert(base | kw, TrainParams)

    def run(grads: list[float], **kw: object) -> list[float]:
        w = torch.nn.Parameter(torch.tensor([1.0]))
        opt = Optimizer([w], params(**kw))
        seen = []
        for g in grads:
            w.grad = torch.tensor([g])
            opt.step()
            seen.append(round(float(w.detach()), 6))
        return seen

    assert run([1.0, 1.0], lr=0.1) == [0.9, 0.8]
    # buf = g, then 0.5 * buf + g: 1 - 0.1 * 1 = 0.9, 0.9 - 0.1 * 1.5 = 0.75
    assert run([1.0, 1.0], lr=0.1, momentum=0.5) == [0.9, 0.75]
    # Adam's bias-corrected steps move by lr under a constant gradient, whatever its scale.
    assert run([1e-3, 1e-3], lr=0.1, optimizer="adam") == pytest.approx([0.9, 0.8], abs=1e-4)
    assert run([5.0, 5.0], lr=0.1, optimizer="adam") == pytest.approx([0.9, 0.8], abs=1e-6)


async def test_the_upload_credential_is_a_header_and_nowhere_else(
    ctx: TaskContext, servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 3 of the hardening review: the slot's credential the coordinator adds to the
    task message goes out in its own header only (X-Lepton-Upload-Token, not Authorization,
    which carries the device's own token): not in the URL, the output or errors."""
    secret = "slot-credential-0123456789abcdef"
    upload = {"url": servers.uploads.upload_url("digits-fl/3/dev1"), "token": secret}
    caplog.set_level("DEBUG")
    out, _ = await run_train(ctx, servers, upload=upload)
    (put,) = servers.uploads.requests
    assert put.headers["X-Lepton-Upload-Token"] == secret
    assert "Authorization" not in put.headers  # an unenrolled device has no token to send
    assert secret not in put.path
    assert secret not in repr(out)
    servers.uploads.fault_puts(Fault(kind="status", status=403))
    with pytest.raises(TaskError) as refused:
        await run_train(ctx, servers, upload=upload)
    assert secret not in str(refused.value)
    assert secret not in caplog.text


@pytest.mark.parametrize("coordinator", ["uploads", "blobs"])
async def test_the_device_token_goes_to_the_coordinator_origin_only(
    tmp_path: Path, ctx: TaskContext, servers: Servers, coordinator: str
) -> None:
    """The device's token rides on every request to the coordinator's origin (the weights
    download and the update upload) and on none to another allowed origin."""
    home = getattr(servers, coordinator)
    device_token = "lpd_device-token-0123456789abcdef"
    creds = CoordinatorCredentials(f"http://127.0.0.1:{home.port}/", device_token)
    store = ModelManager(
        tmp_path / "w2", retries=1, timeout=5.0, backoff=(0.01, 0.05), credentials=creds
    )
    ctx = dataclasses.replace(ctx, services=dataclasses.replace(ctx.services, weights_store=store))
    upload = {"url": servers.uploads.upload_url("digits-fl/3/dev1"), "token": "slot-abc"}
    await run_train(ctx, servers, upload=upload)
    (get,) = [r for r in servers.blobs.requests if r.method == "GET"]
    (put,) = servers.uploads.requests
    assert put.headers["X-Lepton-Upload-Token"] == "slot-abc"
    bearer = f"Bearer {device_token}"
    if coordinator == "uploads":
        assert put.headers["Authorization"] == bearer
        assert "Authorization" not in get.headers
    else:
        assert get.headers["Authorization"] == bearer
        assert "Authorization" not in put.headers


async def test_a_cancel_stops_training_between_batches(ctx: TaskContext, servers: Servers) -> None:
    """The task's cancel token stops the loop at its next batch: no update is uploaded."""
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, ctx.cancel.set, "round_closed")
    started = time.monotonic()
    with pytest.raises(TaskError, match="cancelled"):
        # 1000 epochs of 10 batches of the CNN: minutes of work if nothing stopped it.
        await train(task("train", **train_params(servers, CNN, epochs=1000)), ctx)
    assert time.monotonic() - started < 10
    assert servers.uploads.requests == []
