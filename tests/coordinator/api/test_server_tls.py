"""HTTPS: a real coordinator serving its API over TLS with a certificate from the fleet CA."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from lepton.common.errors import ConfigError
from lepton.common.tls import client_context
from lepton.coordinator.config import load as load_config
from lepton.coordinator.service import Coordinator
from lepton.protocol import routes
from tests.support.pki import Fleet, make_fleet

MakeCoordinator = Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "pki")


def _https(fleet: Fleet, **more: object) -> dict[str, object]:
    return {
        "http__tls_cert_file": str(fleet.server_cert),
        "http__tls_key_file": str(fleet.server_key),
        **more,
    }


def _verify_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_health_over_https_verifies_with_the_fleet_ca_only(
    make_coordinator: MakeCoordinator, fleet: Fleet, tmp_path: Path
) -> None:
    other = make_fleet(tmp_path / "other", "Other CA")
    async with make_coordinator(**_https(fleet)) as c:
        url = c.api_url
        assert url is not None
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(verify=client_context(fleet.ca_file)) as client:
            resp = await client.get(url + routes.HEALTH)
        assert resp.status_code == 200
        for verify in (True, client_context(other.ca_file)):  # system CAs; another fleet's CA
            async with httpx.AsyncClient(verify=verify) as client:
                with pytest.raises(httpx.ConnectError) as err:
                    await client.get(url + routes.HEALTH)
            assert _verify_failure(err.value), err.value
        # Plain HTTP on the TLS port gets no answer at all.
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.get(url.replace("https", "http") + routes.HEALTH)


async def test_a_late_head_gets_408_over_tls_too(
    make_coordinator: MakeCoordinator, fleet: Fleet
) -> None:
    """The head-deadline protocol runs under TLS: a client that completes the handshake and
    sends half a head is answered 408 and closed."""
    async with make_coordinator(**_https(fleet, http__head_timeout_s=0.5)) as c:
        assert c.http is not None
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", c.http.port, ssl=client_context(fleet.ca_file), server_hostname="127.0.0.1"
        )
        try:
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"head_timeout" in answer


async def test_client_certificates_when_a_client_ca_is_set(
    make_coordinator: MakeCoordinator, fleet: Fleet
) -> None:
    cert, key = fleet.device("dev-1")
    overrides = _https(fleet, http__tls_client_ca_file=str(fleet.ca_file))
    async with make_coordinator(**overrides) as c:
        url = f"{c.api_url}{routes.HEALTH}"
        with_cert = client_context(fleet.ca_file, cert, key)
        async with httpx.AsyncClient(verify=with_cert) as client:
            assert (await client.get(url)).status_code == 200
        async with httpx.AsyncClient(verify=client_context(fleet.ca_file)) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(url)


def test_tls_config_is_both_files_or_neither_and_they_exist(fleet: Fleet) -> None:
    def cfg(**overrides: str) -> object:
        return load_config(env={}, overrides={"instance_id": "t", **overrides})

    with pytest.raises(ConfigError) as err:
        cfg(**{"http.tls_cert_file": str(fleet.server_cert)})
    assert err.value.key == "http.tls_cert_file"
    with pytest.raises(ConfigError) as err:
        cfg(**{"http.tls_cert_file": "/nonexistent.crt", "http.tls_key_file": "/x.key"})
    assert "no such file" in str(err.value)
    with pytest.raises(ConfigError) as err:
        cfg(**{"http.tls_client_ca_file": str(fleet.ca_file)})
    assert err.value.key == "http.tls_client_ca_file"
    ok = load_config(
        env={},
        overrides={
            "instance_id": "t",
            "http.tls_cert_file": str(fleet.server_cert),
            "http.tls_key_file": str(fleet.server_key),
        },
    )
    assert ok.http.tls


async def test_a_key_that_is_no_key_fails_start_up(
    make_coordinator: MakeCoordinator, fleet: Fleet
) -> None:
    with pytest.raises(OSError, match="http TLS"):
        async with make_coordinator(
            http__tls_cert_file=str(fleet.server_cert), http__tls_key_file=str(fleet.ca_file)
        ):
            pass
