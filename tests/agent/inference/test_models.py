"""The model manager against a real HTTP server: cache, resume, caps, integrity, atomic swap."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from lepton.agent.fetch import MAX_RETRY_AFTER_S, retry_after_s
from lepton.agent.inference.manager import KEEP_UNREFERENCED, ModelManager
from lepton.agent.inference.served import ModelError, deploy_spec
from lepton.protocol.tasks import DeployParams
from tests.agent.inference.conftest import Linear, make_linear, spec_for
from tests.support.httpserver import Fault, HttpServer


def _predict(manager: ModelManager, name: str, x: np.ndarray) -> np.ndarray:
    with manager.lease(name) as model:
        assert model is not None
        return model.runtime.run({"x": x})["logits"]


async def test_deploy_downloads_verifies_caches_and_serves(
    manager: ModelManager, blobs: HttpServer, linear: Linear
) -> None:
    spec = spec_for(blobs, linear.onnx)
    outcome = await manager.deploy(spec)
    assert outcome.downloaded == len(linear.onnx)
    assert not outcome.cached
    assert outcome.previous is None
    assert outcome.load_s > 0
    cached = manager.cached_path(spec.digest)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == spec.digest
    assert not manager.partial_path(spec.digest).exists()
    index = json.loads((manager.root / "index.json").read_text())
    assert index["models"]["clf"]["digest"] == spec.digest
    np.testing.assert_allclose(
        _predict(manager, "clf", linear.x[:3]), linear.logits(linear.x[:3]), atol=1e-5
    )
    assert [m.name for m in manager.served()] == ["clf"]


async def test_cached_model_costs_no_download(
    tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    spec = spec_for(blobs, linear.onnx)
    first = ModelManager(tmp_path / "models", threads=1)
    await first.deploy(spec)
    assert len(blobs.requests) == 1
    # Same manager, same model: nothing fetched, nothing reloaded.
    again = await first.deploy(spec)
    assert again.downloaded == 0
    assert again.cached
    # Another manager over the same cache (another name, say): a cache hit.
    second = ModelManager(tmp_path / "models", threads=1)
    other = await second.deploy(deploy_spec({**_params(spec), "name": "clf-b"}, max_bytes=1 << 30))
    assert other.downloaded == 0
    assert len(blobs.requests) == 1


def _params(spec: DeployParams) -> dict[str, object]:
    return {
        "name": spec.name,
        "digest": spec.digest,
        "size": spec.size,
        "url": spec.url,
        "format": spec.format,
    }


async def test_drop_mid_body_resumes_with_range(
    manager: ModelManager, blobs: HttpServer, big: Linear
) -> None:
    spec = spec_for(blobs, big.onnx)
    cut = spec.size // 3
    blobs.fault(spec.digest, Fault("drop", at=cut))
    outcome = await manager.deploy(spec)
    assert outcome.downloaded == spec.size  # nothing fetched twice
    ranges = [r.range for r in blobs.requests]
    assert ranges == [None, f"bytes={cut}-"]
    assert blobs.sent(spec.digest) == spec.size


async def test_partial_file_survives_a_failed_deploy_and_is_resumed(
    tmp_path: Path, blobs: HttpServer, big: Linear
) -> None:
    manager = ModelManager(tmp_path / "models", threads=1, retries=0)
    spec = spec_for(blobs, big.onnx)
    cut = spec.size // 2
    blobs.fault(spec.digest, Fault("drop", at=cut))
    with pytest.raises(ModelError) as info:
        await manager.deploy(spec)
    assert info.value.reason == "download_failed"
    assert f"{cut} of {spec.size} bytes kept" in str(info.value)
    assert manager.partial_path(spec.digest).stat().st_size == cut
    outcome = await manager.deploy(spec)
    assert outcome.downloaded == spec.size - cut
    assert blobs.requests[-1].range == f"bytes={cut}-"


async def test_server_ignoring_range_restarts_cleanly(
    manager: ModelManager, blobs: HttpServer, big: Linear
) -> None:
    spec = spec_for(blobs, big.onnx)
    blobs.fault(spec.digest, Fault("drop", at=100))
    blobs.fault(spec.digest, Fault("ignore_range"))
    outcome = await manager.deploy(spec)
    assert outcome.downloaded == 100 + spec.size
    assert manager.get("clf") is not None


async def test_stalled_transfer_times_out_and_resumes(
    tmp_path: Path, blobs: HttpServer, big: Linear
) -> None:
    manager = ModelManager(
        tmp_path / "models", threads=1, retries=4, timeout=0.3, backoff=(0.01, 0.02)
    )
    spec = spec_for(blobs, big.onnx)
    blobs.fault(spec.digest, Fault("slow", delay=1.0, times=2))
    outcome = await manager.deploy(spec)
    assert outcome.downloaded == spec.size
    assert len(blobs.requests) == 3
    # Each stalled attempt kept what it got; the next asked for the rest.
    assert blobs.requests[1].range == f"bytes={blobs.requests[0].sent}-"


async def test_transient_http_errors_are_retried_permanent_ones_are_not(
    manager: ModelManager, blobs: HttpServer, linear: Linear
) -> None:
    spec = spec_for(blobs, linear.onnx)
    blobs.fault(spec.digest, Fault("status", status=503))
    await manager.deploy(spec)
    assert [r.status for r in blobs.requests] == [503, 200]

    other = make_linear(5)
    spec2 = spec_for(blobs, other.onnx, name="other")
    blobs.fault(spec2.digest, Fault("status", status=403, times=-1))
    with pytest.raises(ModelError, match=r"fetch: http_403: .* answered HTTP 403") as info:
        await manager.deploy(spec2)
    assert info.value.reason == "http_403"
    assert len([r for r in blobs.requests if r.path.endswith(spec2.digest)]) == 1


async def test_a_busy_server_has_its_own_longer_budget(
    tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    # 503 is "busy" (a fleet fetching one release at once): eight of them outlast a budget
    # of two failures and the download still completes; three 500s do not.
    manager = ModelManager(tmp_path / "models", threads=1, retries=2, backoff=(0.01, 0.02))
    spec = spec_for(blobs, linear.onnx)
    blobs.fault(spec.digest, Fault("status", status=503, times=8))
    outcome = await manager.deploy(spec)
    assert outcome.downloaded == spec.size
    assert [r.status for r in blobs.requests] == [503] * 8 + [200]

    other = make_linear(5)
    spec2 = spec_for(blobs, other.onnx, name="other")
    blobs.fault(spec2.digest, Fault("status", status=500, times=-1))
    with pytest.raises(ModelError, match="gave up after 3 attempts"):
        await manager.deploy(spec2)


def test_retry_after_is_bounded_seconds() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s("100000") == MAX_RETRY_AFTER_S
    assert retry_after_s("-3") == 0.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_s(None) is None


@pytest.mark.parametrize("kind", ["oversize", "oversize_chunked"])
async def test_declared_length_is_a_hard_cap(
    manager: ModelManager, blobs: HttpServer, big: Linear, kind: str
) -> None:
    spec = spec_for(blobs, big.onnx)
    blobs.fault(spec.digest, Fault(kind, extra=50_000))  # type: ignore[arg-type]
    with pytest.raises(ModelError) as info:
        await manager.deploy(spec)
    assert info.value.reason == "too_large"
    assert not manager.partial_path(spec.digest).exists()
    assert not manager.cached_path(spec.digest).exists()
    # No more than the declared size was ever written, and nothing more was asked for.
    assert len(blobs.requests) == 1


async def test_refusals_keep_the_served_model(
    manager: ModelManager, blobs: HttpServer, linear: Linear, other_linear: Linear
) -> None:
    await manager.deploy(spec_for(blobs, linear.onnx))
    served = manager.get("clf")
    assert served is not None

    # Wrong bytes: the hash does not match; nothing is kept.
    bad = spec_for(blobs, other_linear.onnx)
    blobs.fault(bad.digest, Fault("wrong_bytes"))
    with pytest.raises(ModelError) as info:
        await manager.deploy(bad)
    assert info.value.reason == "digest_mismatch"
    assert not manager.partial_path(bad.digest).exists()
    assert not manager.cached_path(bad.digest).exists()

    # A truncated artifact (short body every time): retried, then refused.
    short = spec_for(blobs, make_linear(7).onnx)
    blobs.fault(short.digest, Fault("truncate", at=short.size - 10, times=-1))
    with pytest.raises(ModelError) as info:
        await manager.deploy(short)
    assert info.value.reason == "download_failed"

    # A corrupt model whose hash is right (the artifact itself is broken): load fails,
    # the file is deleted, and a later deploy fetches it again.
    garbage = linear.onnx[: len(linear.onnx) // 2]
    corrupt = spec_for(blobs, garbage)
    with pytest.raises(ModelError) as info:
        await manager.deploy(corrupt)
    assert info.value.reason == "load_failed"
    assert not manager.cached_path(corrupt.digest).exists()

    assert manager.get("clf") is served
    np.testing.assert_allclose(
        _predict(manager, "clf", linear.x[:2]), linear.logits(linear.x[:2]), atol=1e-5
    )
    index = json.loads((manager.root / "index.json").read_text())
    assert index["models"]["clf"]["digest"] == served.digest


async def test_declared_input_must_match_the_model(
    manager: ModelManager, blobs: HttpServer, linear: Linear
) -> None:
    spec = spec_for(blobs, linear.onnx, input={"shape": [None, 8], "dtype": "float32"})
    with pytest.raises(ModelError, match="dimension 1 is 16, declared 8") as info:
        await manager.deploy(spec)
    assert info.value.reason == "input_mismatch"
    assert manager.get("clf") is None
    ok = spec_for(blobs, linear.onnx, name="ok", input={"name": "x", "shape": [None, 16]})
    await manager.deploy(ok)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"url": "file:///etc/passwd"}, "bad_url"),
        ({"url": "ftp://host/model"}, "bad_url"),
        ({"url": "/relative"}, "bad_url"),
        ({"digest": "abc"}, "bad_params"),
        ({"size": 0}, "bad_params"),
        ({"size": 1 << 40}, "too_large"),
        ({"format": "pt"}, "bad_params"),
        ({"name": "a/b"}, "bad_params"),
        ({"input": {"shape": [1], "colour": "blue"}}, "bad_params"),
    ],
)
def test_bad_deploy_params_are_refused(params: dict[str, object], reason: str) -> None:
    base = {
        "name": "m",
        "digest": "A" * 64,  # upper case is accepted and normalised
        "size": 10,
        "url": "https://models.example/m",
        "format": "onnx",
    }
    assert deploy_spec(base, max_bytes=1 << 20).digest == "a" * 64
    with pytest.raises(ModelError) as info:
        deploy_spec({**base, **params}, max_bytes=1 << 20)
    assert info.value.reason == reason


async def test_restart_serves_the_same_models(
    tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    first = ModelManager(tmp_path / "models", threads=1)
    spec = spec_for(blobs, linear.onnx)
    await first.deploy(spec)
    first.close()
    second = ModelManager(tmp_path / "models", threads=1)
    assert second.get("clf") is None
    await second.restore()
    assert second.restored.is_set()
    model = second.get("clf")
    assert model is not None
    assert model.digest == spec.digest
    assert len(blobs.requests) == 1


async def test_restore_skips_what_it_cannot_load(
    tmp_path: Path, blobs: HttpServer, linear: Linear, other_linear: Linear
) -> None:
    first = ModelManager(tmp_path / "models", threads=1)
    a = spec_for(blobs, linear.onnx, name="a")
    b = spec_for(blobs, other_linear.onnx, name="b")
    await first.deploy(a)
    await first.deploy(b)
    first.cached_path(a.digest).unlink()
    second = ModelManager(tmp_path / "models", threads=1)
    await second.restore()
    assert [m.name for m in second.served()] == ["b"]
    assert second.known("a")


async def test_swap_is_atomic_and_in_flight_users_finish_on_the_old_model(
    manager: ModelManager, blobs: HttpServer, linear: Linear, other_linear: Linear
) -> None:
    await manager.deploy(spec_for(blobs, linear.onnx))
    with manager.lease("clf") as old:
        assert old is not None
        outcome = await manager.deploy(spec_for(blobs, other_linear.onnx))
        assert outcome.previous == old.digest
        # The old model still runs for its user...
        out = old.runtime.run({"x": linear.x[:2]})["logits"]
        np.testing.assert_allclose(out, linear.logits(linear.x[:2]), atol=1e-5)
        # ...while new users get the new one.
        np.testing.assert_allclose(
            _predict(manager, "clf", linear.x[:2]), other_linear.logits(linear.x[:2]), atol=1e-5
        )
    # The last user left: the old runtime is closed.
    with pytest.raises(RuntimeError, match="not loaded"):
        old.runtime.run({"x": linear.x[:1]})


async def test_concurrent_deploys_of_one_digest_download_once(
    manager: ModelManager, blobs: HttpServer, linear: Linear
) -> None:
    spec = spec_for(blobs, linear.onnx, name="a")
    twin = deploy_spec({**_params(spec), "name": "b"}, max_bytes=1 << 30)
    outcomes = await asyncio.gather(manager.deploy(spec), manager.deploy(twin))
    assert sorted(o.downloaded for o in outcomes) == [0, spec.size]
    assert len(blobs.requests) == 1


async def test_cache_keeps_served_models_and_a_few_previous_ones(
    manager: ModelManager, blobs: HttpServer
) -> None:
    digests = []
    for seed in range(10, 15):
        spec = spec_for(blobs, make_linear(seed).onnx)
        digests.append(spec.digest)
        await manager.deploy(spec)
        await asyncio.sleep(0.01)  # distinct modification times
    kept = {p.name for p in manager.cache_dir.iterdir()}
    assert kept == set(digests[-1 - KEEP_UNREFERENCED :])


async def test_deploys_during_restore_keep_every_model(
    tmp_path: Path, blobs: HttpServer, linear: Linear, other_linear: Linear
) -> None:
    first = ModelManager(tmp_path / "models", threads=1)
    await first.deploy(spec_for(blobs, linear.onnx, name="a"))
    await first.deploy(spec_for(blobs, linear.onnx, name="b"))
    first.close()
    # After a restart, a deploy arrives before (or while) the index is restored.
    second = ModelManager(tmp_path / "models", threads=1)
    newer = spec_for(blobs, other_linear.onnx, name="b")
    await asyncio.gather(second.deploy(newer), second.restore())
    assert {m.name: m.digest for m in second.served()} == {
        "a": hashlib.sha256(linear.onnx).hexdigest(),
        "b": newer.digest,
    }
    index = json.loads((second.root / "index.json").read_text())["models"]
    assert {k: v["digest"] for k, v in index.items()} == {
        "a": hashlib.sha256(linear.onnx).hexdigest(),
        "b": newer.digest,
    }
