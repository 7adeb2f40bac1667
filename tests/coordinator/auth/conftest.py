"""A real mosquitto configured by ``lepton broker init`` (the dynamic security plugin), the
coordinator's own MQTT link to it, and paho devices that report connects and disconnects."""

from __future__ import annotations

import getpass
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lepton.coordinator.auth.broker_accounts import DynsecAccounts
from lepton.coordinator.auth.broker_config import BrokerInit, find_plugin, write_broker_files
from lepton.coordinator.config import MqttConfig
from lepton.coordinator.runtime.mqtt import MqttLink
from tests.support.broker import Broker, mosquitto_binary

FLEET = "f1"


@dataclass
class DynsecBroker(Broker):
    """A :class:`Broker` whose config is what ``lepton broker init`` writes (written once, so
    a restart keeps the accounts the plugin saved). ``bind_by_username=False`` drops
    ``use_username_as_clientid``, leaving the client id binding to the plugin alone."""

    fleet: str = FLEET
    bind_by_username: bool = True
    coordinator_password: str = ""

    def write_config(self) -> None:
        if self.coordinator_password:
            return
        init = BrokerInit(
            directory=self.workdir, fleet=self.fleet, port=self.port, run_as=getpass.getuser()
        )
        self.coordinator_password = write_broker_files(init)
        text = self.conf_path.read_text()
        if not self.bind_by_username:
            text = text.replace("use_username_as_clientid true\n", "")
        self.conf_path.write_text(
            text + f"log_dest file {self.log_path}\nlog_type error\nlog_type warning\n"
            "log_type notice\nlog_type information\n"
        )


@pytest.fixture
def dynsec_factory(tmp_path: Path) -> Iterator[Callable[..., DynsecBroker]]:
    if mosquitto_binary() is None or find_plugin() is None:
        pytest.fail("mosquitto or its dynamic security plugin is missing; scripts/test installs")
    started: list[DynsecBroker] = []

    def make(**kw: Any) -> DynsecBroker:
        b = DynsecBroker(workdir=tmp_path / f"dynsec{len(started)}", **kw)
        started.append(b)
        b.start()
        return b

    yield make
    for b in started:
        b.kill()


@pytest.fixture
def dynsec_broker(dynsec_factory: Callable[..., DynsecBroker]) -> DynsecBroker:
    return dynsec_factory()


@dataclass
class Seen:
    """Topics a link received (appended in paho's thread)."""

    topics: list[str] = field(default_factory=list)

    def __call__(self, topic: str, _payload: bytes, _retained: bool) -> None:
        self.topics.append(topic)


def coordinator_link(port: int, password: str, seen: Seen, **mqtt: Any) -> MqttLink:
    cfg = MqttConfig(port=port, username="coordinator", password=password, **mqtt)
    return MqttLink(
        cfg,
        client_id="coordinator",
        subscriptions=[(f"lepton/v1/{FLEET}/device/#", 1)],
        on_message=seen,
    )


@pytest.fixture
async def coordinator(
    dynsec_broker: DynsecBroker,
) -> AsyncIterator[tuple[DynsecAccounts, MqttLink, Seen]]:
    seen = Seen()
    async with coordinator_link(
        dynsec_broker.port, dynsec_broker.coordinator_password, seen
    ) as link:
        assert await link.wait_connected(5)
        yield DynsecAccounts(link, FLEET, timeout_s=5), link, seen


class Device:
    """One paho client (MQTT 5) that never reconnects on its own; times its disconnect."""

    def __init__(self, port: int, username: str, password: str, client_id: str = "") -> None:
        self.port = port
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or username,
            protocol=paho.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.answered = threading.Event()
        self.refused: str | None = None
        self.gone = threading.Event()
        self.gone_at = 0.0
        self.messages: list[str] = []
        self.granted: list[int] = []
        self._subacked = threading.Event()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.refused = str(reason) if reason.is_failure else None
        self.answered.set()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: Any, _p: Any) -> None:
        self.gone_at = time.monotonic()
        self.gone.set()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        self.messages.append(msg.topic)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
        self.granted = [c.value for c in codes]
        self._subacked.set()

    def connect(self, timeout: float = 5) -> bool:
        """True once the broker accepted the connection; False if it refused it."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        assert self.answered.wait(timeout), "no CONNACK"
        return self.refused is None

    def subscribe(self, filt: str) -> int:
        """The SUBACK's reason code (< 0x80: granted)."""
        self._subacked.clear()
        self.client.subscribe(filt, qos=1)
        assert self._subacked.wait(5), "no SUBACK"
        return self.granted[0]

    def publish(self, topic: str) -> None:
        info = self.client.publish(topic, b"x", qos=1)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices() -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(port: int, username: str, password: str, client_id: str = "") -> Device:
        d = Device(port, username, password, client_id)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()
