"""The local inference endpoint over real TCP and a real Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from lepton.agent.inference.endpoint import Endpoint
from lepton.agent.inference.manager import ModelManager
from lepton.agent.inference.unixsock import SocketPathError
from lepton.agent.metrics import Counters
from lepton.protocol.tensors import TensorPayload, from_payload, to_payload
from tests.agent.inference.conftest import Linear, spec_for
from tests.support.httpserver import HttpServer

MSGPACK = {"content-type": "application/msgpack"}


@pytest.fixture
async def endpoint(served: ModelManager, short_dir: Path) -> AsyncIterator[Endpoint]:
    async with Endpoint(
        served,
        port=0,
        socket_path=short_dir / "infer.sock",
        max_body=64 * 1024,
        counters=Counters(),
    ) as ep:
        yield ep


@pytest.fixture
async def tcp(endpoint: Endpoint) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{endpoint.port}") as client:
        yield client


@pytest.fixture
async def uds(endpoint: Endpoint) -> AsyncIterator[httpx.AsyncClient]:
    assert endpoint.socket_path is not None
    transport = httpx.AsyncHTTPTransport(uds=str(endpoint.socket_path))
    async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
        yield client


def _error(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"}
    return body["error"]  # type: ignore[no-any-return]


async def test_health_and_model_listing(tcp: httpx.AsyncClient, linear: Linear) -> None:
    health = await tcp.get("/v1/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "models": ["clf"]}
    models = (await tcp.get("/v1/models")).json()["models"]
    assert len(models) == 1
    model = models[0]
    assert model["name"] == "clf"
    assert model["inputs"] == [{"name": "x", "dtype": "float32", "shape": [None, 16]}]
    assert model["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [None, 4]}]
    assert model["runtime"].startswith("onnxruntime")
    one = await tcp.get("/v1/models/clf")
    assert one.json()["digest"] == model["digest"]


async def test_json_predict_over_tcp_keeps_the_connection(
    tcp: httpx.AsyncClient, endpoint: Endpoint, linear: Linear
) -> None:
    for i in range(20):
        x = linear.x[i : i + 3]
        resp = await tcp.post("/v1/models/clf:predict", json={"inputs": x.tolist()})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"] == "clf"
        np.testing.assert_allclose(body["outputs"]["logits"], linear.logits(x), atol=1e-4)
    assert endpoint.accepted == 1  # one keep-alive connection for all of them
    # Inputs by name work too.
    named = await tcp.post("/v1/models/clf:predict", json={"inputs": {"x": linear.x[:1].tolist()}})
    assert named.status_code == 200


async def test_msgpack_predict_over_unix_socket(uds: httpx.AsyncClient, linear: Linear) -> None:
    x = linear.x[:5]
    body = msgspec.msgpack.encode({"inputs": to_payload(x)})
    resp = await uds.post("/v1/models/clf:predict", content=body, headers=MSGPACK)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "application/msgpack"
    reply = msgspec.msgpack.decode(resp.content)
    out = from_payload(msgspec.convert(reply["outputs"]["logits"], TensorPayload))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, linear.logits(x), atol=1e-5)
    # JSON over the socket as well.
    resp = await uds.post("/v1/models/clf:predict", json={"inputs": x.tolist()})
    assert resp.status_code == 200


@pytest.mark.parametrize(
    ("inputs", "code", "message"),
    [
        ([[1.0, 2.0, 3.0]], "bad_shape", "dimension 1 must be 16, got 3"),
        ([1.0] * 16, "bad_shape", "expected rank 2"),
        ([[1.0] * 16, [1.0] * 15], "bad_array", "not a rectangular array"),
        ([["a"] * 16], "bad_dtype", "expected numbers (float32)"),
        ({"y": [[0.0] * 16]}, "bad_inputs", "unknown inputs ['y']"),
        ({}, "bad_inputs", "missing inputs ['x']"),
        ("text", "bad_inputs", "inputs must be an array"),
    ],
)
async def test_json_inputs_that_do_not_fit_are_400(
    tcp: httpx.AsyncClient, inputs: Any, code: str, message: str
) -> None:
    resp = await tcp.post("/v1/models/clf:predict", json={"inputs": inputs})
    assert resp.status_code == 400
    err = _error(resp)
    assert err["code"] == code
    assert message in err["message"]


async def test_msgpack_inputs_that_do_not_fit_are_400(uds: httpx.AsyncClient) -> None:
    cases = [
        (
            to_payload(np.zeros((2, 16), dtype=np.float64)),
            "bad_dtype",
            "expected dtype float32, got float64",
        ),
        (
            to_payload(np.zeros((2, 8), dtype=np.float32)),
            "bad_shape",
            "dimension 1 must be 16, got 8",
        ),
        ({"dtype": "float32", "shape": [2, 16], "data": b"\0" * 7}, "bad_length", "7 bytes"),
        ({"dtype": "object", "shape": [1], "data": b"\0"}, "bad_dtype", "object"),
        ({"dtype": "float32", "shape": "x", "data": b""}, "bad_tensor", "shape"),
    ]
    for tensor, code, message in cases:
        body = msgspec.msgpack.encode({"inputs": tensor})
        resp = await uds.post("/v1/models/clf:predict", content=body, headers=MSGPACK)
        assert resp.status_code == 400, (tensor, resp.text)
        err = _error(resp)
        assert err["code"] == code, err
        assert message in err["message"], err


async def test_http_level_errors(tcp: httpx.AsyncClient) -> None:
    resp = await tcp.post("/v1/models/nope:predict", json={"inputs": [[0.0] * 16]})
    assert resp.status_code == 404
    assert _error(resp)["code"] == "unknown_model"
    assert (await tcp.get("/v1/models/nope")).status_code == 404
    resp = await tcp.get("/v1/models/clf:predict")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "POST"
    resp = await tcp.post("/v1/health")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "GET"
    assert (await tcp.get("/v2/anything")).status_code == 404
    resp = await tcp.post("/v1/models/clf:predict", content=b"{not json")
    assert resp.status_code == 400
    assert _error(resp)["code"] == "bad_body"
    resp = await tcp.post("/v1/models/clf:predict", json=[1, 2])
    assert resp.status_code == 400
    resp = await tcp.post(
        "/v1/models/clf:predict", content=b"x", headers={"content-type": "text/csv"}
    )
    assert resp.status_code == 415
    # The connection is still good after all of these.
    assert (await tcp.get("/v1/health")).status_code == 200


@pytest.mark.parametrize("depth", [5, 40, 3000, 30000])
@pytest.mark.parametrize("kind", ["json", "msgpack"])
async def test_deeply_nested_bodies_are_400_with_a_reason(
    tcp: httpx.AsyncClient, endpoint: Endpoint, depth: int, kind: str
) -> None:
    """Finding 10 of the hardening review: a deeply nested body dropped the connection."""
    if kind == "json":
        body = b'{"inputs": ' + b"[" * depth + b"0.5" + b"]" * depth + b"}"
        headers = {"content-type": "application/json"}
    else:
        # Written by hand: msgspec's own encoder refuses to nest this deep.
        body = b"\x81\xa6inputs" + b"\x91" * depth + b"\x00"
        headers = MSGPACK
    resp = await tcp.post("/v1/models/clf:predict", content=body, headers=headers)
    assert resp.status_code == 400
    error = _error(resp)
    # JSON lists deeper than the model's rank are refused before numpy walks them; past the
    # interpreter's recursion limit, at decoding. MessagePack inputs must be tensor maps.
    expected = "too_deep" if kind == "json" or depth > 1000 else "bad_inputs"
    assert error["code"] == expected, error
    assert endpoint.counters is not None
    assert endpoint.counters[f"rejected.endpoint_{error['code']}"] == 1
    # The connection (and the endpoint) still serve.
    assert (await tcp.get("/v1/health")).status_code == 200


async def test_too_large_body_is_413(tcp: httpx.AsyncClient, endpoint: Endpoint) -> None:
    big = {"inputs": [[0.5] * 16] * 5000}  # ~400 kB of JSON, cap is 64 kB
    resp = await tcp.post("/v1/models/clf:predict", json=big)
    assert resp.status_code == 413
    assert _error(resp)["code"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(100):
            yield b" " * 1024

    resp = await tcp.post("/v1/models/clf:predict", content=chunks())
    assert resp.status_code == 413


async def test_malformed_http_is_400_and_closed(endpoint: Endpoint) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    assert data.startswith(b"HTTP/1.1 400 ")
    writer.close()


async def test_concurrent_requests_all_succeed(endpoint: Endpoint, linear: Linear) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> None:
        x = linear.x[i : i + 1]
        resp = await client.post("/v1/models/clf:predict", json={"inputs": x.tolist()})
        assert resp.status_code == 200
        np.testing.assert_allclose(resp.json()["outputs"]["logits"], linear.logits(x), atol=1e-4)

    base = f"http://127.0.0.1:{endpoint.port}"
    async with httpx.AsyncClient(base_url=base) as client:
        await asyncio.gather(*(one(client, i) for i in range(64)))


async def test_a_swap_is_seen_by_the_next_request(
    tcp: httpx.AsyncClient,
    served: ModelManager,
    blobs: HttpServer,
    linear: Linear,
    other_linear: Linear,
) -> None:
    x = linear.x[:2]
    await served.deploy(spec_for(blobs, other_linear.onnx))
    resp = await tcp.post("/v1/models/clf:predict", json={"inputs": x.tolist()})
    np.testing.assert_allclose(resp.json()["outputs"]["logits"], other_linear.logits(x), atol=1e-4)


async def test_socket_path_handling(served: ModelManager, short_dir: Path) -> None:
    path = short_dir / "sub" / "agent.sock"
    async with Endpoint(served, socket_path=path) as ep:
        assert ep.port is None
        assert path.is_socket()
        assert path.stat().st_mode & 0o777 == 0o660
    assert not path.exists()
    # A stale socket left by a killed agent is replaced; a regular file is not touched.
    import socket

    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    async with Endpoint(served, socket_path=path):
        pass
    path.write_text("precious")
    with pytest.raises(SocketPathError, match="is not a socket; not removing it"):
        async with Endpoint(served, socket_path=path):
            pass
    assert path.read_text() == "precious"
    with pytest.raises(ValueError, match="port, a socket path"):
        Endpoint(served)


async def test_models_that_failed_to_restore_are_503(
    tmp_path: Path, blobs: HttpServer, linear: Linear
) -> None:
    first = ModelManager(tmp_path / "models", threads=1)
    spec = spec_for(blobs, linear.onnx)
    await first.deploy(spec)
    first.close()
    first.cached_path(spec.digest).write_bytes(b"bit rot")
    second = ModelManager(tmp_path / "models", threads=1)
    await second.restore()
    async with (
        Endpoint(second, port=0) as ep,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}") as client,
    ):
        resp = await client.post("/v1/models/clf:predict", json={"inputs": [[0.0] * 16]})
        assert resp.status_code == 503
        err = _error(resp)
        assert err["code"] == "unavailable"
        assert "could not be restored" in err["message"]
        assert "digest_mismatch" in err["message"]  # re-verified, not served altered
    # A new deploy of the name fixes it.
    await second.deploy(spec)
    assert second.unavailable("clf") is None


async def test_connections_past_the_cap_get_503(served: ModelManager) -> None:
    async with Endpoint(served, port=0, max_connections=1) as ep:
        _, idle_writer = await asyncio.open_connection("127.0.0.1", ep.port)
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", ep.port)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 503 ")
        writer.close()
        idle_writer.close()


async def _trickler(port: int, *, in_body: bool) -> tuple[asyncio.Task[bytes], float]:
    """A client that sends a request a byte every 0.2 s (never idle long enough for a
    per-read timeout) until the endpoint answers or closes; its task returns the first
    bytes of the answer (b"" for a close, b"reset" for a reset)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"POST /v1/models/clf:predict HTTP/1.1\r\nHost: x\r\n"
    if in_body:
        head += b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n"
    writer.write(head)

    async def run() -> bytes:
        reading = asyncio.ensure_future(reader.read(65536))
        try:
            while not reading.done():
                with contextlib.suppress(ConnectionError, RuntimeError):
                    writer.write(b" " if in_body else b"X-a: b\r\n")
                await asyncio.wait([reading], timeout=0.2)
            return reading.result()
        except ConnectionError:
            return b"reset"
        finally:
            writer.close()

    return asyncio.create_task(run()), asyncio.get_running_loop().time()


async def test_trickling_connections_neither_lock_out_clients_nor_stay(
    served: ModelManager,
) -> None:
    """Finding 8 of the hardening review: 66 connections trickling a byte at a time made
    every other client get 503 for 90 s and more."""
    deadline = 2.0
    counters = Counters()
    async with Endpoint(
        served, port=0, max_connections=64, request_timeout=deadline, counters=counters
    ) as ep:
        loop = asyncio.get_running_loop()
        opened = loop.time()
        # Half stall in their headers, half in their body.
        slow = [await _trickler(ep.port, in_body=i % 2 == 0) for i in range(66)]
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ep.port}") as client:
                while True:  # a client that retries on 503, as the API asks
                    resp = await client.get("/v1/health")
                    if resp.status_code != 503:
                        break
                    await asyncio.sleep(0.1)
                served_after = loop.time() - opened
                assert resp.status_code == 200
                # Served once a trickler could be closed for it, before the deadline.
                assert served_after < deadline + 1.0, served_after

                # Every slow connection is closed by the whole-request deadline although it
                # never paused for long; those still waiting then are answered 408.
                answers = await asyncio.wait_for(
                    asyncio.gather(*(t for t, _ in slow)), deadline + 3.0
                )
                closed_after = loop.time() - opened
                assert closed_after < deadline + 3.0, closed_after
                firsts = [a[:12] for a in answers]
                assert set(firsts) <= {b"", b"reset", b"HTTP/1.1 408", b"HTTP/1.1 503"}, firsts
                assert firsts.count(b"HTTP/1.1 408") >= 30, firsts
                assert counters["rejected.endpoint_request_timeout"] >= 30
                assert counters["endpoint.evicted"] >= 1
                # And the endpoint serves normally afterwards.
                assert (await client.get("/v1/health")).status_code == 200
                print(
                    f"\n66 tricklers, {deadline} s deadline: a client served after "
                    f"{served_after:.2f} s, every trickler closed after {closed_after:.2f} s "
                    f"({firsts.count(b'HTTP/1.1 408')} with 408)"
                )
        finally:
            for t, _ in slow:
                t.cancel()
