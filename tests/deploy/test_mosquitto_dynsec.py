"""deploy/mosquitto/dynsec.conf: the template says what `lepton broker init` writes, and it
boots a real mosquitto in which the coordinator's account administers devices."""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass
from pathlib import Path

from lepton.coordinator.auth.broker_accounts import DynsecAccounts
from lepton.coordinator.auth.broker_config import (
    BrokerInit,
    find_plugin,
    mosquitto_conf,
    write_broker_files,
)
from lepton.coordinator.config import MqttConfig
from lepton.coordinator.runtime.mqtt import MqttLink
from tests.support.broker import Broker

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "dynsec.conf"
PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def directives(text: str) -> list[str]:
    """Option names in order, comments and values aside."""
    return [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]


def test_the_template_is_what_init_writes() -> None:
    init = BrokerInit(
        directory=Path("/etc/mosquitto/lepton"),
        fleet="default",
        data_dir=Path("/var/lib/mosquitto"),
        tls_port=8883,
        cafile="/etc/mosquitto/certs/lepton-ca.crt",
        certfile="/etc/mosquitto/certs/broker.crt",
        keyfile="/etc/mosquitto/certs/broker.key",
    )
    written = mosquitto_conf(init, PLUGIN)
    template = TEMPLATE.read_text()
    assert directives(template) == directives(written)
    values = {ln for ln in written.splitlines() if ln and not ln.startswith("#")}
    for line in template.splitlines():
        if line and not line.startswith("#"):
            assert line in values, f"dynsec.conf has {line!r}; lepton broker init does not"


@dataclass
class TemplateBroker(Broker):
    """The template with test paths, without its TLS listener (no certificates here)."""

    password: str = ""

    def write_config(self) -> None:
        init = BrokerInit(directory=self.workdir, fleet="default", port=self.port)
        self.password = write_broker_files(init)
        text = TEMPLATE.read_text()
        text = re.sub(r"\n# TLS listener.*?tls_version tlsv1.2\n", "\n", text, flags=re.S)
        assert "\nlistener 8883" not in text
        for old, new in {
            "listener 1883 127.0.0.1": f"listener {self.port} 127.0.0.1",
            PLUGIN: find_plugin() or PLUGIN,
            "/etc/mosquitto/lepton/": f"{self.workdir}/",
            "/var/lib/mosquitto/": f"{self.workdir / 'data'}/",
        }.items():
            assert old in text, old
            text = text.replace(old, new)
        self.conf_path.write_text(f"user {getpass.getuser()}\n{text}")


async def test_the_template_boots_and_the_coordinator_administers_it(tmp_path: Path) -> None:
    broker = TemplateBroker(workdir=tmp_path / "b")
    broker.start()
    try:
        cfg = MqttConfig(port=broker.port, username="coordinator", password=broker.password)
        async with MqttLink(
            cfg, client_id="coordinator", subscriptions=[], on_message=lambda *_: None
        ) as link:
            accounts = DynsecAccounts(link, "default")
            await accounts.ensure_ready()
            await accounts.provision("dev-1", "pw")
            await accounts.remove("dev-1")
    finally:
        broker.kill()
