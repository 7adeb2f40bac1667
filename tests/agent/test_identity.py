"""The agent runs with its identity: identity.json (mode 0600 or refused) feeds the config, an
explicit conflicting id is an error, and the device token goes to the coordinator only."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgspec
import pytest

from lepton.agent import credentials
from lepton.agent.cli import main
from lepton.agent.config import load_config
from lepton.agent.credentials import CoordinatorCredentials
from lepton.agent.fetch import BlobFetcher, FetchError
from lepton.agent.identity import write_identity
from lepton.agent.origins import Origins
from lepton.common.errors import ConfigError
from lepton.protocol.enrolment import EnrollResponse, MqttAccount
from tests.support.enrolserver import FakeEnrolment
from tests.support.httpserver import Fault, HttpServer

TOKEN = "lpd_the-device-token-0123456789"
PASSWORD = "mqtt-password-0123456789"


def _enrolled(state: Path, *, ca: bool = True) -> EnrollResponse:
    resp = EnrollResponse(
        device_id="pi-7",
        fleet="farm",
        http_token=TOKEN,
        coordinator_url="https://coord.example:8443",
        mqtt=MqttAccount(
            host="mqtt.example", port=8883, tls=True, username="pi-7", password=PASSWORD
        ),
        ca_pem=FakeEnrolment("https://coord.example:8443").ca_pem if ca else None,
        device_group="lab",
    )
    write_identity(state, resp)
    return resp


def _load(state: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return load_config(None, env={}, overrides={"agent.state_dir": state, **overrides})


def test_the_config_takes_the_identity(tmp_path: Path) -> None:
    _enrolled(tmp_path)
    cfg = _load(tmp_path)
    assert (cfg.device.id, cfg.device.fleet) == ("pi-7", "farm")
    assert (cfg.broker.username, cfg.broker.password) == ("pi-7", PASSWORD)
    assert (cfg.broker.host, cfg.broker.port, cfg.broker.tls) == ("mqtt.example", 8883, True)
    assert cfg.broker.ca_file == cfg.fetch.ca_file == tmp_path / "fleet-ca.pem"
    assert cfg.fetch.coordinator_url == "https://coord.example:8443"
    assert cfg.fetch.http_token == TOKEN
    assert TOKEN not in repr(cfg)


def test_a_client_certificate_in_the_identity_is_the_mqtt_client_certificate(
    tmp_path: Path,
) -> None:
    resp = _enrolled(tmp_path)
    pem = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n"
    write_identity(tmp_path, msgspec.structs.replace(resp, cert_pem=pem), key_pem=b"key")
    cfg = _load(tmp_path)
    assert cfg.broker.cert_file == tmp_path / "client.crt"
    assert cfg.broker.key_file == tmp_path / "client.key"
    # Enrolled again without a certificate: the old pair is gone, not read as this one's.
    write_identity(tmp_path, resp)
    cfg = _load(tmp_path)
    assert cfg.broker.cert_file is None
    assert not (tmp_path / "client.key").exists()


def test_the_agent_sends_its_token_with_its_downloads(tmp_path: Path) -> None:
    """The daemon hands the config's token to both of its download caches."""
    from lepton.agent.daemon import Agent

    _enrolled(tmp_path)
    agent = Agent(_load(tmp_path))
    for store in (agent.models, agent.services.weights_store):
        assert store is not None
        creds = store.fetcher.credentials
        assert creds.headers_for("https://coord.example:8443/v1/blobs/x") == {
            "Authorization": f"Bearer {TOKEN}"
        }
        assert creds.headers_for("https://other.example:8443/v1/blobs/x") == {}


def test_explicit_settings_win_where_the_identity_only_fills_in(tmp_path: Path) -> None:
    _enrolled(tmp_path)
    cfg = _load(tmp_path, **{"broker.host": "10.0.0.2", "device.id": "pi-7"})
    assert cfg.broker.host == "10.0.0.2"  # where to connect: the explicit setting
    assert cfg.broker.password == PASSWORD  # who to connect as: the identity


def test_an_explicit_conflicting_device_id_is_a_config_error(tmp_path: Path) -> None:
    _enrolled(tmp_path)
    with pytest.raises(ConfigError, match=r"device.id .*'pi-9'.*enrolled as 'pi-7'") as err:
        _load(tmp_path, **{"device.id": "pi-9"})
    assert err.value.key == "device.id"
    with pytest.raises(ConfigError, match=r"device\.fleet"):
        load_config(
            None, env={"LEPTON_DEVICE_FLEET": "other"}, overrides={"agent.state_dir": tmp_path}
        )
    with pytest.raises(ConfigError, match=r"fetch\.http_token is set to a different value") as err:
        load_config(
            None,
            env={"LEPTON_FETCH_HTTP_TOKEN": "lpd_another"},
            overrides={"agent.state_dir": tmp_path},
        )
    assert "lpd_another" not in str(err.value)


def test_a_readable_identity_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _enrolled(tmp_path)
    path = tmp_path / "identity.json"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        _load(tmp_path)
    assert main(["run", "--agent-state-dir", str(tmp_path)]) == 2
    assert "mode 0644" in capsys.readouterr().err


def test_a_token_needs_the_coordinator_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="coordinator's origin only") as err:
        load_config(
            None, env={"LEPTON_FETCH_HTTP_TOKEN": "lpd_x"}, overrides={"agent.state_dir": tmp_path}
        )
    assert "lpd_x" not in str(err.value)
    cfg = load_config(
        None,
        env={"LEPTON_FETCH_HTTP_TOKEN": "lpd_x", "LEPTON_FETCH_COORDINATOR_URL": "http://c:1"},
        overrides={"agent.state_dir": tmp_path},
    )
    assert cfg.fetch.http_token == "lpd_x"


def test_the_token_is_not_read_from_the_config_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[fetch]\nhttp_token = "lpd_x"\n')
    with pytest.raises(ConfigError, match="LEPTON_FETCH_HTTP_TOKEN"):
        load_config(cfg, env={})


def test_no_identity_runs_as_before_and_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _load(tmp_path, **{"device.id": "plain"})
    assert cfg.fetch.http_token is None
    assert cfg.device.id == "plain"
    monkeypatch.setattr(credentials, "_warned", False)
    caplog.set_level(logging.WARNING)
    for _ in range(3):
        credentials.warn_if_not_enrolled(CoordinatorCredentials("http://127.0.0.1:1", None))
    warnings = [r for r in caplog.records if "not enrolled" in r.getMessage()]
    assert len(warnings) == 1
    assert "lepton-agent enroll" in warnings[0].getMessage()


async def test_downloads_carry_the_token_to_the_coordinator_only(tmp_path: Path) -> None:
    with HttpServer() as coord, HttpServer() as cdn:
        creds = CoordinatorCredentials(coord.base_url, TOKEN)
        fetcher = BlobFetcher(
            tmp_path,
            retries=0,
            origins=Origins.from_config(coord.base_url, ("http://127.0.0.1:*",)),
            credentials=creds,
        )
        a, b = coord.add(b"from the coordinator"), cdn.add(b"from another origin")
        await fetcher.fetch(digest=a, size=20, url=coord.url(a))
        await fetcher.fetch(digest=b, size=19, url=cdn.url(b))
        assert coord.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"
        assert "Authorization" not in cdn.requests[0].headers


@pytest.mark.parametrize(("token", "reason"), [(None, "not_enrolled"), (TOKEN, "token_refused")])
async def test_a_refused_download_says_whether_the_device_is_enrolled(
    tmp_path: Path, token: str | None, reason: str
) -> None:
    with HttpServer() as coord:
        digest = coord.add(b"secured")
        coord.fault(digest, Fault(kind="status", status=401, times=-1))
        fetcher = BlobFetcher(
            tmp_path, retries=3, credentials=CoordinatorCredentials(coord.base_url, token)
        )
        with pytest.raises(FetchError) as err:
            await fetcher.fetch(digest=digest, size=7, url=coord.url(digest))
        assert err.value.reason == reason
        assert len(coord.requests) == 1  # not retried
        if token is None:
            assert "not enrolled" in str(err.value)
            assert "lepton-agent enroll" in str(err.value)
