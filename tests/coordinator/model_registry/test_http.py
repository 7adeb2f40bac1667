from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import Engine

from lepton.coordinator.model_registry.registry import ModelRegistry
from lepton.coordinator.model_registry.routes import make_router
from tests.support.api import bearer, guarded, operator_token

DATA = bytes(range(256)) * 40  # 10,240 bytes
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
async def client(registry: ModelRegistry, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    registry.import_bytes(DATA, name="blobby", format="torch", precision="fp32")
    transport = httpx.ASGITransport(app=guarded(engine, make_router(registry)))
    headers = bearer(operator_token(engine, ["fleet:read"]))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://coordinator", headers=headers
    ) as c:
        yield c


async def test_full_get_and_head(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/blobs/{DIGEST}")
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["content-length"] == str(len(DATA))
    assert r.headers["etag"] == f'"{DIGEST}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/octet-stream"
    assert "immutable" in r.headers["cache-control"]
    h = await client.head(f"/v1/blobs/{DIGEST}")
    assert h.status_code == 200
    assert h.content == b""
    assert h.headers["content-length"] == str(len(DATA))
    assert h.headers["etag"] == f'"{DIGEST}"'


@pytest.mark.parametrize(
    ("spec", "start", "end"),
    [
        ("bytes=0-0", 0, 0),
        ("bytes=100-199", 100, 199),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-40", 10200, 10239),
        ("bytes=10200-999999", 10200, 10239),
    ],
)
async def test_single_range(client: httpx.AsyncClient, spec: str, start: int, end: int) -> None:
    r = await client.get(f"/v1/blobs/{DIGEST}", headers={"Range": spec})
    assert r.status_code == 206
    assert r.content == DATA[start : end + 1]
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(DATA)}"
    assert r.headers["content-length"] == str(end - start + 1)
    assert r.headers["etag"] == f'"{DIGEST}"'


async def test_resume_with_if_range(client: httpx.AsyncClient) -> None:
    ok = await client.get(
        f"/v1/blobs/{DIGEST}", headers={"Range": "bytes=5000-", "If-Range": f'"{DIGEST}"'}
    )
    assert ok.status_code == 206
    assert ok.content == DATA[5000:]
    stale = await client.get(
        f"/v1/blobs/{DIGEST}", headers={"Range": "bytes=5000-", "If-Range": '"other"'}
    )
    assert stale.status_code == 200
    assert stale.content == DATA


async def test_unsatisfiable_range(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/blobs/{DIGEST}", headers={"Range": f"bytes={len(DATA)}-"})
    assert r.status_code == 416
    assert r.headers["content-range"] == f"bytes */{len(DATA)}"


async def test_unknown_and_malformed_digests(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"/v1/blobs/{'0' * 64}")).status_code == 404
    assert (await client.head(f"/v1/blobs/{'0' * 64}")).status_code == 404
    for bad in (DIGEST.upper(), DIGEST[:-1], DIGEST + "0", "sha256:" + DIGEST, "z" * 64):
        r = await client.get(f"/v1/blobs/{bad}")
        assert r.status_code == 422, bad
    assert (await client.get("/v1/blobs/..%2F..%2Fetc%2Fpasswd")).status_code in (404, 422)


async def test_model_metadata(client: httpx.AsyncClient, registry: ModelRegistry) -> None:
    registry.import_bytes(
        b"v2", name="blobby", format="torch", precision="int8", parent_version=1, accuracy_int8=0.9
    )
    listing = (await client.get("/v1/models")).json()["models"]
    assert [(m["name"], m["version"]) for m in listing] == [("blobby", 1), ("blobby", 2)]
    one = (await client.get("/v1/models/blobby")).json()
    assert one["latest"]["version"] == 2
    assert one["latest"]["parent_version"] == 1
    assert next(v["digest"] for v in one["versions"]) == DIGEST
    assert (await client.get("/v1/models/blobby/1")).json()["digest"] == DIGEST
    assert (await client.get("/v1/models/blobby/3")).status_code == 404
    assert (await client.get("/v1/models/nothing")).status_code == 404
    assert (await client.get("/v1/models/bad%20name")).status_code == 422
    filtered = (await client.get("/v1/models", params={"name": "nothing"})).json()
    assert filtered == {"models": []}
