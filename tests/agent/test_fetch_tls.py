"""The agent's downloads and uploads over HTTPS: verified against ``[fetch] ca_file`` (the
fleet CA) and the host name, refused at once (no retries) when the server does not verify."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from lepton.agent.config import AgentConfig, load_config
from lepton.agent.daemon import Agent
from lepton.agent.fetch import BlobFetcher, FetchError
from lepton.agent.handlers import TaskError
from lepton.agent.training.upload import upload
from lepton.common.errors import ConfigError
from lepton.common.tls import client_context
from tests.support.httpserver import HttpServer
from tests.support.pki import Fleet, make_fleet

BLOB = bytes(range(256)) * 1000


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "pki")


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    return make_fleet(tmp_path / "other", "Other CA").ca_file


def _agent_config(tmp_path: Path, server: HttpServer, ca_file: Path | None) -> AgentConfig:
    values: dict[str, object] = {
        "device.id": "dev-1",
        "agent.state_dir": tmp_path / "state",
        "agent.probe": False,
        "fetch.coordinator_url": server.origin,
    }
    if ca_file is not None:
        values["fetch.ca_file"] = ca_file
    return load_config(None, env={}, overrides=values)


async def test_agent_fetches_over_https_with_the_fleet_ca(fleet: Fleet, tmp_path: Path) -> None:
    with HttpServer(tls=fleet.server_context()) as server:
        digest = server.add(BLOB)
        agent = Agent(_agent_config(tmp_path, server, fleet.ca_file))
        fetcher = agent.models.fetcher
        assert server.url(digest).startswith("https://")
        path, downloaded = await fetcher.fetch(
            digest=digest, size=len(BLOB), url=server.url(digest)
        )
        assert downloaded == len(BLOB)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        # Training's weights cache and uploads use the same context.
        weights = agent.services.weights_store
        assert weights is not None
        assert weights.fetcher.tls is fetcher.tls is not None
        url = server.upload_url("job/1/dev-1")
        sha = hashlib.sha256(b"update").hexdigest()
        tls = await fetcher.tls_context()
        assert await upload(url, b"update", digest=sha, tls=tls) == 1
        assert server.body(url) == b"update"


@pytest.mark.parametrize("trust", ["other_ca", "system"])
async def test_fetch_fails_closed_without_retrying_when_the_server_does_not_verify(
    fleet: Fleet, other_ca: Path, tmp_path: Path, trust: str
) -> None:
    tls = client_context(other_ca) if trust == "other_ca" else None  # None: system CAs
    with HttpServer(tls=fleet.server_context()) as server:
        digest = server.add(BLOB)
        fetcher = BlobFetcher(tmp_path / "cache", retries=5, backoff=(2.0, 2.0), tls=tls)
        started = time.monotonic()
        with pytest.raises(FetchError) as err:
            await fetcher.fetch(digest=digest, size=len(BLOB), url=server.url(digest))
        assert err.value.reason == "tls_verify_failed"
        assert time.monotonic() - started < 2.0  # no retry backoff was slept
        assert not fetcher.cached_path(digest).exists()
        assert server.requests == []  # not one byte of HTTP went out
        url = server.upload_url("job/1/dev-1")
        sha = hashlib.sha256(b"update").hexdigest()
        with pytest.raises(TaskError, match=r"upload_refused.*did not verify"):
            await upload(url, b"update", digest=sha, tls=tls, retries=5, backoff=(2.0, 2.0))
        assert server.requests == []


def test_an_unreadable_fetch_ca_file_stops_the_agent_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate")
    with HttpServer() as server, pytest.raises(ConfigError, match=r"fetch\.ca_file"):
        Agent(_agent_config(tmp_path, server, bad))
