"""TLS on the MQTT links, with a real Mosquitto serving certificates from a fleet CA.

One broker, four listeners: plain (the test's own observer), TLS with the fleet's server
certificate (``localhost``/``127.0.0.1``), TLS with a certificate for another host name, and
mutual TLS (``require_certificate`` + ``use_identity_as_username``). Its ACL grants a device
the topics under its username (``%u``) only, so a certificate's CN is what it may publish as.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from cryptography import x509

from lepton.common.tls import client_context
from lepton.coordinator.auth import cafiles
from lepton.coordinator.config import MqttConfig
from lepton.coordinator.runtime.mqtt import MqttLink
from lepton.coordinator.service import Coordinator
from tests.coordinator.conftest import eventually
from tests.integration.conftest import StartAgent
from tests.support.api import api_client
from tests.support.broker import Broker, free_port
from tests.support.pki import Fleet, make_fleet, tls_listener

ACL = """\
# Anonymous clients (the test's observer, the coordinator) see everything.
topic readwrite #
pattern write lepton/v1/+/device/%u/#
pattern read lepton/v1/+/cmd/%u/#
"""


@dataclass
class TlsBroker:
    broker: Broker
    fleet: Fleet
    tls_port: int  # the fleet's server certificate
    wrong_name_port: int  # a certificate for broker.elsewhere.example only
    mtls_port: int  # client certificates required; CN = username


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return make_fleet(tmp_path / "pki")


@pytest.fixture
def tls_broker(broker_factory: Callable[..., Broker], fleet: Fleet, tmp_path: Path) -> TlsBroker:
    cert, key = fleet.issue_server("elsewhere", ["broker.elsewhere.example"])
    ports = free_port(), free_port(), free_port()
    acl = tmp_path / "acl"
    acl.write_text(ACL)
    b = broker_factory(
        f"acl_file {acl}\n"
        + tls_listener(ports[0], fleet)
        + tls_listener(ports[1], fleet, cert=cert, key=key)
        + tls_listener(ports[2], fleet, require_certificate=True)
    )
    return TlsBroker(b, fleet, *ports)


@pytest.fixture
def broker(tls_broker: TlsBroker) -> Broker:
    """The coordinator fixtures' broker is the TLS one."""
    return tls_broker.broker


async def _connect(port: int, tls: ssl.SSLContext, ident: str = "probe") -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=ident, tls_context=tls, timeout=3):
        pass


def _refused_for(err: BaseException, text: str) -> bool:
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) and text in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def test_server_verification_fleet_ca_other_ca_wrong_host(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    """The contexts the agent's and the coordinator's links use (lepton.common.tls)."""
    fleet_tls = client_context(tls_broker.fleet.ca_file)
    await _connect(tls_broker.tls_port, fleet_tls)
    other = make_fleet(tmp_path / "other", "Other CA")
    with pytest.raises(aiomqtt.MqttError) as err:
        await _connect(tls_broker.tls_port, client_context(other.ca_file))
    assert _refused_for(err.value, "certificate verify failed")
    with pytest.raises(aiomqtt.MqttError) as err:
        await _connect(tls_broker.wrong_name_port, fleet_tls)
    assert _refused_for(err.value, "mismatch")


async def test_mtls_device_certificate_from_a_csr_is_its_username(tls_broker: TlsBroker) -> None:
    fleet = tls_broker.fleet
    with pytest.raises(aiomqtt.MqttError):  # no client certificate
        await _connect(tls_broker.mtls_port, client_context(fleet.ca_file))
    cert, key = fleet.device("dev-1")
    device_tls = client_context(fleet.ca_file, cert, key)
    async with aiomqtt.Client("127.0.0.1", tls_broker.broker.port, identifier="watch") as watch:
        await watch.subscribe("lepton/v1/default/device/#", qos=1)
        async with aiomqtt.Client(
            "127.0.0.1", tls_broker.mtls_port, identifier="anything", tls_context=device_tls
        ) as device:
            # The ACL grants %u's topics: only the CN's get through. (A refused publish
            # makes this Mosquitto drop the connection, so the refused one is sent last.)
            await device.publish("lepton/v1/default/device/dev-1/state", b"mine", qos=1)
            await device.publish("lepton/v1/default/device/dev-2/state", b"other", qos=0)
        seen = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                async for message in watch.messages:
                    seen.append((str(message.topic), message.payload))
        assert seen == [("lepton/v1/default/device/dev-1/state", b"mine")]


async def test_coordinator_link_verifies_the_broker(tls_broker: TlsBroker, tmp_path: Path) -> None:
    other = make_fleet(tmp_path / "other", "Other CA")

    @contextlib.asynccontextmanager
    async def link(port: int, ca: Path) -> AsyncIterator[MqttLink]:
        cfg = MqttConfig(port=port, tls=True, ca_file=str(ca), reconnect_min_s=1.0)
        async with MqttLink(
            cfg, client_id="coord", subscriptions=[], on_message=lambda *a: None
        ) as mqtt:
            yield mqtt

    async with link(tls_broker.tls_port, tls_broker.fleet.ca_file) as mqtt:
        assert await mqtt.wait_connected(10)
    # Where the broker requires a certificate, the coordinator's own (lepton ca issue-client).
    cert, key = cafiles.save_issued(
        tmp_path, "coordinator", tls_broker.fleet.ca.issue_client("coordinator")
    )
    cfg = MqttConfig(
        port=tls_broker.mtls_port,
        tls=True,
        ca_file=str(tls_broker.fleet.ca_file),
        cert_file=str(cert),
        key_file=str(key),
    )
    async with MqttLink(cfg, client_id="c", subscriptions=[], on_message=lambda *a: None) as mqtt:
        assert await mqtt.wait_connected(10)
    async with link(tls_broker.tls_port, other.ca_file) as mqtt:
        assert not await mqtt.wait_connected(2)
    async with link(tls_broker.wrong_name_port, tls_broker.fleet.ca_file) as mqtt:
        assert not await mqtt.wait_connected(2)


async def test_a_revoked_device_certificate_is_refused(
    broker_factory: Callable[..., Broker], fleet: Fleet
) -> None:
    """The CA's CRL (FleetCA.crl) in the listener's ``crlfile``."""
    revoked_cert, revoked_key = fleet.device("dev-lost")
    good_cert, good_key = fleet.device("dev-ok")
    serial = x509.load_pem_x509_certificate(revoked_cert.read_bytes()).serial_number
    crl = fleet.dir / "fleet.crl"
    crl.write_bytes(fleet.ca.crl([serial]))
    port = free_port()
    broker_factory(tls_listener(port, fleet, require_certificate=True) + f"crlfile {crl}\n")
    await _connect(port, client_context(fleet.ca_file, good_cert, good_key))
    with pytest.raises(aiomqtt.MqttError):
        await _connect(port, client_context(fleet.ca_file, revoked_cert, revoked_key))


@pytest.mark.slow
async def test_fleet_over_tls_devices_by_certificate(
    tls_broker: TlsBroker,
    make_coordinator: Callable[..., contextlib.AbstractAsyncContextManager[Coordinator]],
    agents: StartAgent,
) -> None:
    """A coordinator on the TLS listener, agent processes on the mutual-TLS one: the device
    whose certificate names it comes online and runs a task; one whose certificate names
    another device publishes nothing the broker lets through."""
    fleet = tls_broker.fleet

    def broker_section(device_id: str, cn: str) -> dict[str, Any]:
        cert, key = fleet.device(device_id, cn=cn)
        return {
            "port": tls_broker.mtls_port,
            "tls": True,
            "ca_file": str(fleet.ca_file),
            "cert_file": str(cert),
            "key_file": str(key),
        }

    async with make_coordinator(
        mqtt__port=tls_broker.tls_port, mqtt__tls=True, mqtt__ca_file=str(fleet.ca_file)
    ) as coord:
        agents(0, "pi-a", broker=broker_section("pi-a", "pi-a"))
        agents(0, "pi-b", broker=broker_section("pi-b", "pi-z"))  # a certificate for pi-z
        async with api_client(coord, timeout=10) as api:

            async def state(device_id: str) -> str | None:
                resp = await api.get(f"/v1/devices/{device_id}")
                return resp.json()["state"] if resp.status_code == 200 else None

            async def online() -> bool:
                return await state("pi-a") == "online"

            await eventually(online, timeout=30, interval=0.2)
            r = await api.post("/v1/tasks", json={"kind": "echo", "params": {"payload": 7}})
            assert r.status_code == 201, r.text

            async def done() -> dict[str, Any] | None:
                task: dict[str, Any] = (await api.get(f"/v1/tasks/{r.json()['id']}")).json()
                return task if task["state"] == "succeeded" else None

            task = await eventually(done, timeout=30, interval=0.2)
            assert task["device_id"] == "pi-a"
            assert task["output"]["echo"] == 7
            assert await state("pi-b") is None  # its birth never got through
