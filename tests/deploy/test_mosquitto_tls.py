"""The shipped TLS listener (deploy/mosquitto/tls.conf) with certificates from ``lepton ca
init``, client certificates required as its comments describe: a device's certificate is its
identity, and the shipped ACL holds it to its own topics."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiomqtt
import pytest

from lepton.common.tls import client_context
from lepton.coordinator.auth import cafiles
from lepton.coordinator.cli.main import main
from lepton.protocol import topics
from tests.deploy.conftest import DEPLOY, ShippedBroker, ShippedFactory
from tests.support.broker import free_port
from tests.support.pki import Fleet


def render_tls(port: int, pki: Path) -> str:
    """tls.conf for a test: its port and certificate paths, client certificates on."""
    text = (DEPLOY / "tls.conf").read_text()
    for old, new in {
        "listener 8883": f"listener {port} 127.0.0.1",
        "/etc/mosquitto/certs/lepton-ca.crt": str(pki / "ca.crt"),
        "/etc/mosquitto/certs/broker.crt": str(pki / "server.crt"),
        "/etc/mosquitto/certs/broker.key": str(pki / "server.key"),
        "# require_certificate true": "require_certificate true",
        "# use_identity_as_username true": "use_identity_as_username true",
    }.items():
        assert old in text, f"tls.conf no longer has {old!r}; update this renderer"
        text = text.replace(old, new)
    return "\n" + text


@pytest.fixture
def pki(tmp_path: Path) -> Fleet:
    directory = tmp_path / "pki"
    assert main(["ca", "init", "--dir", str(directory), "--san", "127.0.0.1"]) == 0
    return Fleet(directory, cafiles.load_ca(directory))


async def test_shipped_tls_listener_with_device_certificates(
    shipped_broker_factory: ShippedFactory, pki: Fleet
) -> None:
    port = free_port()
    users = {"coordinator": "pw-coordinator"}
    broker: ShippedBroker = shipped_broker_factory(users, extra_config=render_tls(port, pki.dir))
    cert, key = pki.device("dev-a")
    state = topics.device_topic("default", "dev-a", topics.STATE)
    other = topics.device_topic("default", "dev-b", topics.STATE)
    seen: list[tuple[str, bytes]] = []
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, username="coordinator", password="pw-coordinator"
    ) as coordinator:
        await coordinator.subscribe("lepton/v1/default/device/#", qos=1)
        # No certificate: refused.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                "127.0.0.1", port, tls_context=client_context(pki.ca_file), timeout=3
            ):
                pass
        # Its certificate, no password: it is dev-a, and may publish as dev-a only.
        tls = client_context(pki.ca_file, cert, key)
        async with aiomqtt.Client("127.0.0.1", port, identifier="x", tls_context=tls) as dev:
            await dev.publish(state, b"online", qos=1)
            await dev.publish(other, b"spoof", qos=0)  # refused (the connection may close)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for m in coordinator.messages:
                    seen.append((str(m.topic), m.payload))
    assert seen == [(state, b"online")]
