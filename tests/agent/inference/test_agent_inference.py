"""End to end through a real agent and a real mosquitto: deploy, infer, refuse, restart."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np

from lepton.agent.config import load_config
from lepton.agent.daemon import Agent
from lepton.protocol.messages import Result
from tests.agent.inference.conftest import Linear
from tests.support.agents import Sink
from tests.support.broker import Broker
from tests.support.httpserver import Fault, HttpServer


@contextlib.asynccontextmanager
async def running_agent(broker: Broker, state: Path, **overrides: object) -> AsyncIterator[Agent]:
    """An in-process agent; a shutdown that hangs fails with every task's stack."""
    values = {
        "device.id": "dev-1",
        "broker.port": broker.port,
        "broker.keepalive_s": 5,
        "broker.reconnect_min_s": 0.1,
        "broker.reconnect_max_s": 1.0,
        "agent.state_dir": state,
        "agent.capacity_interval_s": 0.5,
        "agent.capacity_min_interval_s": 0.1,
        "agent.probe": False,
        **{k.replace("__", "."): v for k, v in overrides.items()},  # fetch__coordinator_url
    }
    async with Agent(load_config(None, env={}, overrides=values)) as agent:
        runner = asyncio.create_task(agent.run())
        try:
            async with asyncio.timeout(10):
                await agent.link.connected.wait()
            yield agent
        finally:
            agent.stop()
            done, _ = await asyncio.wait([runner], timeout=20)
            if not done:
                stacks = io.StringIO()
                for task in asyncio.all_tasks():
                    print(f"--- {task.get_name()}", file=stacks)
                    task.print_stack(limit=10, file=stacks)
                runner.cancel()
                raise AssertionError(f"agent did not stop in 20 s; tasks:\n{stacks.getvalue()}")
            runner.result()


async def _run(sink: Sink, kind: str, timeout: float = 20, **params: object) -> Result:
    task = await sink.send_task("dev-1", kind, **params)
    await sink.wait(lambda: task.task_id in sink.results_for({task.task_id}), timeout, kind)
    return sink.results_for({task.task_id})[task.task_id]


def _deploy(blobs: HttpServer, data: bytes, digest: str | None = None) -> dict[str, object]:
    digest = digest or blobs.add(data)
    return {
        "name": "digits",
        "digest": digest,
        "size": len(data),
        "url": blobs.url(digest),
        "format": "onnx",
        "precision": "fp32",
    }


async def _endpoint_port(agent: Agent) -> int:
    async with asyncio.timeout(10):
        while agent.endpoint_port is None:
            await asyncio.sleep(0.02)
    return agent.endpoint_port


async def test_deploy_infer_refuse_and_restart(
    broker: Broker,
    tmp_path: Path,
    blobs: HttpServer,
    linear: Linear,
    other_linear: Linear,
) -> None:
    np.savez(tmp_path / "val.npz", x=linear.x, y=linear.y)
    state = tmp_path / "state"
    overrides = {
        "data": {"val": str(tmp_path / "val.npz")},
        "endpoint.port": 0,
        "fetch.coordinator_url": f"http://127.0.0.1:{blobs.port}",
    }
    good = _deploy(blobs, linear.onnx)
    async with Sink(broker.port) as sink:
        async with running_agent(broker, state, **overrides) as agent:
            deployed = await _run(sink, "deploy", **good)
            assert deployed.status == "succeeded", deployed.error
            assert deployed.output["bytes_downloaded"] == len(linear.onnx)

            result = await _run(sink, "infer", model="digits", source="val", batch_size=50)
            assert result.status == "succeeded", result.error
            assert result.output["accuracy"] == 1.0
            assert result.output["count"] == len(linear.x)
            assert result.output["latency_ms"]["sample"]["p99"] > 0

            # A corrupted artifact (bytes that do not hash to the digest) is refused...
            corrupted = _deploy(blobs, other_linear.onnx, digest=blobs.add(other_linear.onnx))
            blobs.put(str(corrupted["digest"]), other_linear.onnx[:-1] + b"\0")
            refused = await _run(sink, "deploy", **corrupted)
            assert refused.status == "failed"
            assert "digest_mismatch" in (refused.error or "")
            # ...and so is one whose hash is right but which is not a model.
            garbage = _deploy(blobs, b"\0" * 4096)
            refused = await _run(sink, "deploy", **garbage)
            assert refused.status == "failed"
            assert "load_failed" in (refused.error or "")

            # The first model is still served, to tasks and to local applications.
            result = await _run(sink, "infer", model="digits", source="val")
            assert result.status == "succeeded", result.error
            assert result.output["digest"] == good["digest"]
            assert result.output["accuracy"] == 1.0
            port = await _endpoint_port(agent)
            async with httpx.AsyncClient() as client:
                resp = await client.post(
                    f"http://127.0.0.1:{port}/v1/models/digits:predict",
                    json={"inputs": linear.x[:2].tolist()},
                )
            assert resp.status_code == 200
            np.testing.assert_allclose(
                resp.json()["outputs"]["logits"], linear.logits(linear.x[:2]), atol=1e-4
            )
        requests_before = len(blobs.requests)

        # After a restart the agent serves the same model from its cache.
        async with running_agent(broker, state, **overrides) as agent:
            await agent.models.restored.wait()
            result = await _run(sink, "infer", model="digits", source="val")
            assert result.status == "succeeded", result.error
            assert result.output["digest"] == good["digest"]
            assert len(blobs.requests) == requests_before


async def test_deploys_fetch_only_from_allowed_origins(
    broker: Broker, tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    """Finding 7 of the hardening review: a deploy's URL could point anywhere (redirects
    followed, remote error text returned in results: a port scanner inside the network)."""
    with HttpServer() as elsewhere:
        inside = elsewhere.add(linear.onnx)
        coordinator = f"http://127.0.0.1:{blobs.port}"
        async with (
            Sink(broker.port) as sink,
            running_agent(broker, tmp_path / "state", fetch__coordinator_url=coordinator) as agent,
        ):
            # Another host (here: another port) is refused before any connection.
            other = {**_deploy(elsewhere, linear.onnx), "url": elsewhere.url(inside)}
            refused = await _run(sink, "deploy", **other)
            assert refused.status == "failed"
            assert "fetch: refused_origin" in (refused.error or "")
            # A port nothing listens on gets the same answer, not a connection error.
            closed = {**other, "url": "http://127.0.0.1:9/blobs/x"}
            refused_closed = await _run(sink, "deploy", **closed)
            assert "fetch: refused_origin" in (refused_closed.error or "")
            assert "Errno" not in (refused_closed.error or "")
            assert elsewhere.requests == []

            # The allowed origin redirecting elsewhere: not followed.
            good = _deploy(blobs, linear.onnx)
            blobs.fault(str(good["digest"]), Fault("redirect", location=elsewhere.url(inside)))
            redirected = await _run(sink, "deploy", **good)
            assert redirected.status == "failed"
            assert "fetch: http_302" in (redirected.error or "")
            assert elsewhere.requests == []

            # An error page's text never reaches the result.
            secret = b"<html>internal admin console v1.2 at 10.0.0.7</html>"
            blobs.fault(str(good["digest"]), Fault("status", status=404, body=secret))
            missing = await _run(sink, "deploy", **good)
            assert missing.status == "failed"
            assert "fetch: http_404" in (missing.error or "")
            assert "admin console" not in (missing.error or "")

            deployed = await _run(sink, "deploy", **good)  # and the coordinator's blob works
            assert deployed.status == "succeeded", deployed.error
            assert agent.models.get("digits") is not None


async def test_an_agent_told_no_origin_fetches_nothing(
    broker: Broker, tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    async with Sink(broker.port) as sink, running_agent(broker, tmp_path / "state"):
        refused = await _run(sink, "deploy", **_deploy(blobs, linear.onnx))
        assert refused.status == "failed"
        assert "fetch: refused_origin" in (refused.error or "")
        assert "none configured" in (refused.error or "")
        assert blobs.requests == []


async def test_the_agent_endpoint_asks_for_its_token(broker: Broker, tmp_path: Path) -> None:
    token = "agent-endpoint-token-0123456789"
    token_file = tmp_path / "endpoint.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    overrides = {"endpoint.port": 0, "endpoint.token_file": token_file}
    async with running_agent(broker, tmp_path / "state", **overrides) as agent:
        port = await _endpoint_port(agent)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            refused = await client.get("/v1/models")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = await client.get("/v1/models", headers={"authorization": "Bearer " + "x" * 30})
            assert wrong.status_code == 401
            ok = await client.get("/v1/models", headers={"authorization": f"Bearer {token}"})
            assert ok.status_code == 200
            assert ok.json() == {"models": []}
        # The refusals are in the counters every capacity report carries.
        assert agent.counters["endpoint.unauthorized.missing"] == 1
        assert agent.counters["endpoint.unauthorized.wrong"] == 1
